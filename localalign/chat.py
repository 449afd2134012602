"""Rendering a model's chat template, safely.

Chat templates are Jinja programs that arrive inside model files from anywhere. They are
rendered only in Jinja's immutable sandbox, which refuses attribute access to internals
(`__class__`, `__globals__`, ...) and so the route to `os` or `subprocess`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localalign.errors import UserError
from localalign.families import Family, fold_system, template_variables

Message = dict[str, str]


class TemplateRefused(UserError):
    """The sandbox stopped a chat template reaching for Python internals."""


@lru_cache(maxsize=16)
def _compile(template: str):
    # The environment transformers renders chat templates in: trim_blocks, lstrip_blocks, loop
    # controls ({% break %}), its `tojson` and `raise_exception`.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):  # templates call this to reject bad conversations
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[Message],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render `messages` with `template`, as transformers' apply_chat_template does; `variables`
    are passed to the template too (families.template_variables: the fixed date, Qwen3's
    `enable_thinking`, ...), as apply_chat_template passes its keyword arguments."""
    if not template:
        raise UserError("the model has no chat template")
    try:
        context = {**dict(variables or {}), "messages": messages, "add_generation_prompt": add_generation_prompt,
                   "bos_token": bos_token, "eos_token": eos_token}
        return _compile(template).render(context)
    except SecurityError as e:
        raise TemplateRefused(f"chat template refused by the sandbox: {e}") from None
    except TemplateError as e:
        raise UserError(f"chat template failed to render: {e}") from None


def render_conversation(
    template: str,
    messages: list[Message],
    family: Family | None,
    special_tokens: Mapping[str, str] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """A conversation as localalign renders it everywhere: training data, generation prompts,
    evaluation, the parity probes. The family's rules apply (a system prompt folded into the
    first user turn where the template has no system role; its template variables, and a fixed
    date: families.template_variables). `special_tokens`: bos_token, eos_token, ... as transformers
    passes them. One renderer, ours: transformers 5 hands templates no function of ours, so its
    `strftime_now` would print today's date into the training data."""
    special = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, (str, list))}
    return render_chat(template, fold_system(messages, family), add_generation_prompt,
                       bos_token=special.get("bos_token") or "", eos_token=special.get("eos_token") or "",
                       variables={**special, **template_variables(family)})


def read_hf_chat_template(hf_dir: str | Path) -> str | None:
    """An HF directory's chat template as transformers 5 loads it: chat_template.jinja, else
    tokenizer_config.json's (a list of named templates: the one named "default", as llama.cpp
    picks). None if it has none."""
    hf_dir = Path(hf_dir)
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            # newline="" keeps \r\n as written: the GGUF copy must be byte-identical.
            with open(jinja, encoding="utf-8", newline="") as f:
                return f.read()
        except UnicodeDecodeError:
            raise UserError(f"{jinja}: not valid UTF-8") from None
    try:
        config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None
