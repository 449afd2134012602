"""The child side of convert/converter.py: runs one of llama.cpp's converters in this process,
with the gguf-py bundled beside them first on the import path.

Executed by path, never imported by the package (its `gguf` must be the bundled one, newer code
than pip's gguf 0.19 although both say 0.19):

    python converter_child.py CONVERTER_DIR convert_hf_to_gguf.py [--vocab-from F] -- ARGS...
    python converter_child.py CONVERTER_DIR --extract-vocab SOURCE.gguf OUT.gguf

`--vocab-from F`: the model's tokenizer is copied from the GGUF `F` (every `tokenizer.*` key but
the chat template, which comes from the HF directory) instead of being rebuilt from the HF
tokenizer files. A model that came in as a GGUF goes back out with exactly the tokenizer it
came with: transformers' rebuild of a GGUF tokenizer loses what llama.cpp needs (the
pre-tokenizer's name, a SentencePiece model file), and the converter would refuse it or guess.
`--extract-vocab` writes those keys of SOURCE into a small GGUF with no tensors (the HF copy's
tokenizer.gguf, convert/gguf_to_hf.py).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


# Per-token arrays, and what a padding token gets in each: the converter's own padding
# (`[PAD{i}]`, unused, score -1000) for a model whose embedding has more rows than tokens.
PER_TOKEN = {"tokenizer.ggml.tokens": lambda i: f"[PAD{i}]", "tokenizer.ggml.token_type": lambda i: 5,
             "tokenizer.ggml.scores": lambda i: -1000.0}


def copy_tokenizer_fields(reader, writer, value_types, rows: int | None = None) -> int:
    """Every `tokenizer.*` key of a GGUFReader but the chat template into a GGUFWriter; how many.

    `rows`: the model's embedding rows. A vocabulary with fewer tokens is padded to it, as the
    converter pads an HF vocabulary (llama.cpp refuses a token list shorter than the embedding);
    one with more tokens than rows belongs to another model and is refused."""
    n = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer.") or field.name == CHAT_TEMPLATE_KEY:
            continue
        main = field.types[0]
        sub = field.types[-1] if main == value_types.ARRAY else None
        value = field.contents()
        if rows is not None and field.name in PER_TOKEN:
            if len(value) > rows:
                raise ValueError(f"the tokenizer has {len(value)} tokens but the model's embedding only "
                                 f"{rows} rows: it belongs to another model")
            value = list(value) + [PER_TOKEN[field.name](i) for i in range(len(value), rows)]
        writer.add_key_value(field.name, value, main, sub_type=sub)
        n += 1
    return n


def use_vocab_from(donor: Path) -> None:
    """Make the converter take the tokenizer from `donor` for whatever model class it picks."""
    import conversion
    import gguf

    pick = conversion.get_model_class

    def get_model_class(*args, **kwargs):
        cls = pick(*args, **kwargs)

        class WithDonorVocab(cls):
            model_arch = cls.model_arch  # the converter checks that every model class names one

            def set_vocab(self):
                rows = self.hparams.get("vocab_size")
                n = copy_tokenizer_fields(gguf.GGUFReader(donor), self.gguf_writer, gguf.GGUFValueType, rows)
                if n == 0:
                    raise ValueError(f"{donor} holds no tokenizer keys")
                from localalign.chat import read_hf_chat_template  # jinja2 only: safe beside this gguf

                template = read_hf_chat_template(self.dir_model)
                if template:
                    self.gguf_writer.add_chat_template(template)

        WithDonorVocab.__name__ = WithDonorVocab.__qualname__ = cls.__name__
        return WithDonorVocab

    conversion.get_model_class = get_model_class


def extract_vocab(source: Path, out: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    if copy_tokenizer_fields(reader, writer, gguf.GGUFValueType) == 0:
        raise SystemExit(f"{source} holds no tokenizer keys")
    template = reader.fields.get(CHAT_TEMPLATE_KEY)
    if template is not None:
        writer.add_chat_template(template.contents())
    name = reader.fields.get("general.name")
    if name is not None:  # llama.cpp keys some behaviour on it (Phi-3's special tokens): exports keep it
        writer.add_name(name.contents())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str]) -> None:
    converter_dir = Path(argv[1]).resolve()
    sys.path[0:0] = [str(converter_dir / "gguf-py"), str(converter_dir)]
    if argv[2] == "--extract-vocab":
        extract_vocab(Path(argv[3]), Path(argv[4]))
        return
    script, rest = argv[2], argv[3:]
    if rest[:1] == ["--vocab-from"]:
        use_vocab_from(Path(rest[1]))
        rest = rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.argv = [str(converter_dir / script), *rest]
    runpy.run_path(str(converter_dir / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
