"""An Ollama Modelfile next to every exported GGUF, so `ollama create` works without edits.

Ollama does not run Jinja chat templates; it wants a Go template. Translating Jinja in
general is impossible, but chat templates of the kind we export (ChatML and its relatives)
are "a prefix, the content, a suffix" per role, plus a generation prompt and sometimes a
default system message. We measure those pieces by rendering the Jinja template on marker
messages, rebuild the conversation from them, and only use them if the rebuild reproduces
the Jinja rendering exactly on a set of probe conversations. Otherwise the Modelfile says
why it has no TEMPLATE instead of shipping a wrong one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Mapping

from localalign.chat import Message, read_hf_chat_template, render_chat
from localalign.errors import UserError
from localalign.families import end_of_turn_ids, family_of_config, template_variables
from localalign.fsutil import atomic_write_text

ROLES = ("system", "user", "assistant")
_MARK = "\ue000{}\ue001"  # private-use characters: never produced by a template itself


@dataclass(frozen=True)
class ChatAffixes:
    prefix: dict[str, str]  # role -> text before the message content
    suffix: dict[str, str]  # role -> text after it
    generation_prompt: str  # appended after the last non-assistant message
    default_system: str  # emitted when the conversation does not start with a system message


def _split_once(text: str, marker: str) -> tuple[str, str]:
    before, sep, after = text.partition(marker)
    if not sep or marker in after:
        raise ValueError(f"marker {marker!r} not rendered exactly once")
    return before, after


def _tail(full: str, head: str) -> str:
    if not full.startswith(head):
        raise ValueError("rendering is not incremental in the conversation")
    return full[len(head) :]


def chat_affixes(template: str, bos_token: str = "", eos_token: str = "",
                 variables: Mapping[str, Any] | None = None) -> ChatAffixes:
    """Measure per-role prefix/suffix of a chat template; ValueError if it is not of that shape."""

    def render(messages: list[Message], gen: bool = False) -> str:
        return render_chat(template, messages, add_generation_prompt=gen, bos_token=bos_token, eos_token=eos_token,
                           variables=variables)

    sys_msg = {"role": "system", "content": _MARK.format("S")}
    user_msg = {"role": "user", "content": _MARK.format("U")}
    asst_msg = {"role": "assistant", "content": _MARK.format("A")}
    prefix, suffix = {}, {}
    prefix["system"], suffix["system"] = _split_once(render([sys_msg]), sys_msg["content"])
    prefix["user"], suffix["user"] = _split_once(_tail(render([sys_msg, user_msg]), render([sys_msg])), user_msg["content"])
    prefix["assistant"], suffix["assistant"] = _split_once(
        _tail(render([sys_msg, user_msg, asst_msg]), render([sys_msg, user_msg])), asst_msg["content"]
    )
    gen = _tail(render([sys_msg, user_msg], gen=True), render([sys_msg, user_msg]))
    user_only = render([user_msg])
    block = prefix["user"] + user_msg["content"] + suffix["user"]
    if not user_only.endswith(block):
        raise ValueError("a lone user message renders differently from one after a system message")
    return ChatAffixes(prefix, suffix, gen, user_only[: -len(block)])


def render_with_affixes(a: ChatAffixes, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """What the Go template below produces, in Python (to check the translation)."""
    out = [] if messages and messages[0]["role"] == "system" else [a.default_system]
    for m in messages:
        out += [a.prefix[m["role"]], m["content"], a.suffix[m["role"]]]
    if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
        out.append(a.generation_prompt)
    return "".join(out)


def go_template(a: ChatAffixes) -> str:
    """The same rendering as an Ollama (Go text/template) TEMPLATE.

    Written on one line without `{{-` trim markers: trimming would eat the newlines that
    are part of the prefixes and suffixes.
    """
    parts = ['{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}', a.default_system, "{{ end }}"]
    parts.append("{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    for k, role in enumerate(ROLES):
        parts += ["{{ if" if k == 0 else "{{ else if", f' eq $m.Role "{role}" }}}}']
        parts += [a.prefix[role], "{{ $m.Content }}", a.suffix[role]]
    parts.append('{{ end }}{{ if and $last (ne $m.Role "assistant") }}')
    parts += [a.generation_prompt, "{{ end }}{{ end }}"]
    return "".join(parts)


# Conversations on which a translation must reproduce the Jinja rendering exactly.
_CHECK_CONVERSATIONS: list[list[Message]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": " d "},
    ],
    [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ],
]


def translate_template(template: str, bos_token: str = "", eos_token: str = "",
                       variables: Mapping[str, Any] | None = None) -> str:
    """The Go template equivalent of a Jinja chat template rendered with `variables` (Qwen3's
    `enable_thinking = False` becomes an empty think block in the generation prompt, as the
    model was trained); ValueError where there is none."""
    a = chat_affixes(template, bos_token, eos_token, variables)
    for conv in _CHECK_CONVERSATIONS:
        # Ollama treats a trailing assistant message as a reply to continue: no generation prompt.
        for gen in (True, False) if conv[-1]["role"] != "assistant" else (False,):
            want = render_chat(template, conv, add_generation_prompt=gen, bos_token=bos_token, eos_token=eos_token,
                               variables=variables)
            if render_with_affixes(a, conv, gen) != want:
                raise ValueError(f"prefix/suffix rebuild differs from the template on {conv!r}")
    text = go_template(a)
    if '"""' in text or "{{" in "".join([*a.prefix.values(), *a.suffix.values(), a.generation_prompt, a.default_system]):
        raise ValueError("template text cannot be quoted in a Modelfile")
    return text


def modelfile_text(
    from_path: str,
    template: str | None,
    stop: list[str],
    bos_token: str = "",
    eos_token: str = "",
    adapter_path: str | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Modelfile text: FROM, optional ADAPTER, TEMPLATE, one `PARAMETER stop` per stop string."""
    lines = ["# Written by localalign export. Create the model with: ollama create NAME -f THIS_FILE", f"FROM {from_path}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    if template:
        try:
            lines.append(f'TEMPLATE """{translate_template(template, bos_token, eos_token, variables)}"""')
        except (ValueError, UserError) as e:
            lines.append(f"# No TEMPLATE: the chat template could not be translated to Ollama's format ({e}).")
    else:
        lines.append("# No TEMPLATE: the model has no chat template.")
    for s in stop:
        if '"' in s or "\n" in s:
            continue
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | Path, text: str) -> Path:
    atomic_write_text(path, text)
    return Path(path)


def modelfile_for(hf_dir: Path, from_path: str, adapter: str | None = None) -> str:
    """Modelfile text for an export of `hf_dir`: template and stop strings from its tokenizer."""
    config = _json(hf_dir / "config.json")
    family = family_of_config(config, hf_dir)
    tokens, control = _tokenizer_tokens(hf_dir)
    tcfg = _json(hf_dir / "tokenizer_config.json")
    bos, eos = _special_text(tcfg, "bos_token"), _special_text(tcfg, "eos_token")
    eos_ids = [tokens.index(eos)] if eos in tokens else []
    for source in (_json(hf_dir / "generation_config.json"), config):
        value = source.get("eos_token_id")
        eos_ids += [int(v) for v in value] if isinstance(value, list) else [int(value)] if value is not None else []
    vocab = {t: i for i, t in enumerate(tokens) if t}
    stops = list(dict.fromkeys(tokens[i] for i in end_of_turn_ids(family, vocab, eos_ids) if i < len(tokens)))
    template = read_hf_chat_template(hf_dir)
    variables = template_variables(family)
    if template:
        # The special token that opens a user turn: a model that starts writing the user's
        # next turn has finished its own (Ollama's ChatML models stop on it too).
        try:
            user_prefix = chat_affixes(template, bos, eos, variables).prefix["user"]
            stops += [t for t in control if user_prefix.startswith(t) and t not in stops][:1]
        except (ValueError, UserError):
            pass
    return modelfile_text(from_path, template, stops, bos, eos, adapter_path=adapter, variables=variables)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_text(tokenizer_config: dict, key: str) -> str:
    entry = tokenizer_config.get(key)
    text = entry.get("content") if isinstance(entry, dict) else entry
    return text if isinstance(text, str) else ""


def _tokenizer_tokens(hf_dir: Path) -> tuple[list[str], list[str]]:
    """(token text by id, the special added tokens) of the directory's tokenizer.json."""
    from tokenizers import Tokenizer  # not transformers: importing it costs seconds

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: no tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    tokens = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size(with_added_tokens=True))]
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    return tokens, [t["content"] for t in added if t.get("special")]
