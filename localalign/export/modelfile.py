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

import gguf

from localalign.chat import Message, render_chat
from localalign.convert.hf_reader import id_list, read_config, read_vocab, special_id
from localalign.errors import UserError
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


def chat_affixes(template: str, bos_token: str = "", eos_token: str = "") -> ChatAffixes:
    """Measure per-role prefix/suffix of a chat template; ValueError if it is not of that shape."""

    def render(messages: list[Message], gen: bool = False) -> str:
        return render_chat(template, messages, add_generation_prompt=gen, bos_token=bos_token, eos_token=eos_token)

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


def translate_template(template: str, bos_token: str = "", eos_token: str = "") -> str:
    """The Go template equivalent of a Jinja chat template; ValueError where there is none."""
    a = chat_affixes(template, bos_token, eos_token)
    for conv in _CHECK_CONVERSATIONS:
        # Ollama treats a trailing assistant message as a reply to continue: no generation prompt.
        for gen in (True, False) if conv[-1]["role"] != "assistant" else (False,):
            want = render_chat(template, conv, add_generation_prompt=gen, bos_token=bos_token, eos_token=eos_token)
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
) -> str:
    """Modelfile text: FROM, optional ADAPTER, TEMPLATE, one `PARAMETER stop` per stop string."""
    lines = ["# Written by localalign export. Create the model with: ollama create NAME -f THIS_FILE", f"FROM {from_path}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    if template:
        try:
            lines.append(f'TEMPLATE """{translate_template(template, bos_token, eos_token)}"""')
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
    config = read_config(hf_dir)
    vocab = read_vocab(hf_dir, config["vocab_size"])
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    tcfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    bos_id, eos_id = special_id(tj, tcfg, "bos"), special_id(tj, tcfg, "eos")
    bos = vocab.tokens[bos_id] if bos_id is not None else ""
    eos = vocab.tokens[eos_id] if eos_id is not None else ""
    stop_ids = id_list(eos_id) + id_list(gen.get("eos_token_id")) + id_list(config.get("eos_token_id"))
    stops = list(dict.fromkeys(vocab.tokens[i] for i in stop_ids))
    if vocab.chat_template:
        # The special token that opens a user turn: a model that starts writing the user's
        # next turn has finished its own (Ollama's ChatML models stop on it too).
        try:
            user_prefix = chat_affixes(vocab.chat_template, bos, eos).prefix["user"]
            control = [t for t, ty in zip(vocab.tokens, vocab.types) if ty == gguf.TokenType.CONTROL and t]
            stops += [t for t in control if user_prefix.startswith(t) and t not in stops][:1]
        except (ValueError, UserError):
            pass
    return modelfile_text(from_path, vocab.chat_template, stops, bos, eos, adapter_path=adapter)
