"""Rendering a model's chat template, safely.

Chat templates are Jinja programs that arrive inside model files from anywhere. They are
rendered only in Jinja's immutable sandbox, which refuses attribute access to internals
(`__class__`, `__globals__`, ...) and so the route to `os` or `subprocess`.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localalign.errors import UserError

Message = dict[str, str]


class TemplateRefused(UserError):
    """The sandbox stopped a chat template reaching for Python internals."""


@lru_cache(maxsize=16)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):  # templates call this to reject bad conversations
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[Message],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render `messages` with `template`, as transformers' apply_chat_template does."""
    if not template:
        raise UserError("the model has no chat template")
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except SecurityError as e:
        raise TemplateRefused(f"chat template refused by the sandbox: {e}") from None
    except TemplateError as e:
        raise UserError(f"chat template failed to render: {e}") from None
