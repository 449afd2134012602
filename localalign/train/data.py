"""Training data for the LoRA trainer: chat-template encoding, batch plans, collation.

Pure functions over token ids (the tokenizer is passed in), so they are tested without a
model. The pieces:

- `encode_sample`: one `Sample` -> input ids + labels, rendered with the tokenizer's own
  chat template. Labels are -100 on the prompt (system + user + the assistant header) and
  on anything after the end-of-turn token, so the loss is on the response and the
  end-of-turn token that teaches the model to stop.
- `epoch_plan`: which samples go into which micro-batch in an epoch; a pure function of
  (lengths, batch size, seed, epoch), so a resumed run rebuilds exactly the same batches
  from nothing but the step number.
- `collate_packed` / `collate_padded`: micro-batch tensors. Packed: one row, no padding,
  position ids restart per sample (transformers turns that into a block-diagonal causal
  mask, so packed samples never attend to each other). Padded: one right-padded row per
  sample, for length-bucketed batches. Both also say where the targets are
  (`response_index`), so the device never has to find them.

Targets are shifted per sample *before* packing: position t predicts token t+1 of the
same sample, and the last token of a sample predicts nothing (never the next sample).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localalign.errors import UserError
from localalign.chat import render_conversation
from localalign.families import Family
from localalign.families import end_of_turn_ids as family_end_of_turn_ids
from localalign.samples import Sample

IGNORE = -100  # label of a position without loss (PyTorch's cross_entropy ignore_index)
BATCHING = ("pack", "bucket")

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # HF convention, unshifted: labels[t] == input_ids[t] on response tokens, else -100
    # The same prompt with the answer not to give (a preference pair's rejected side), if any.
    rejected: "Encoded | None" = None

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def end_of_turn_ids(tokenizer, hf_dir: str | Path | None = None, family: Family | None = None) -> set[int]:
    """Token ids that end an assistant turn: the tokenizer's eos, generation_config's eos ids and
    the family's end-of-turn tokens (families.end_of_turn_ids)."""
    eos: list[int | None] = [tokenizer.eos_token_id]
    gen = Path(hf_dir) / "generation_config.json" if hf_dir is not None else None
    if gen is not None and gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        eos += value if isinstance(value, list) else [value]
    ids = set(family_end_of_turn_ids(family, tokenizer.get_vocab(), eos))
    if not ids:
        raise UserError("the tokenizer has no eos token; cannot tell where an assistant turn ends")
    return ids


def chat_messages(sample: Sample) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": sample.system}] if sample.system else []
    return messages + [{"role": "user", "content": sample.prompt}]


def encode_sample(tokenizer, sample: Sample, eot_ids: set[int], family: Family | None = None) -> Encoded:
    """Render `sample` with the chat template and mark the response tokens as labels.

    The prompt is the template's rendering with the generation prompt (exactly what the
    model sees at inference: chat.render_conversation, the engine's renderer);
    the response is the rest of the full conversation's rendering up to and including the last
    end-of-turn token. Tokenized once, as a whole, without adding special tokens: the template
    already writes BOS where the model wants one.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; the trainer needs one to format samples")
    messages = chat_messages(sample)
    special = tokenizer.special_tokens_map
    prompt_text = render_conversation(tokenizer.chat_template, messages, family, special)
    full_text = render_conversation(tokenizer.chat_template, messages + [{"role": "assistant", "content": sample.response}],
                                    family, special, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise UserError(
            "the chat template renders the prompt differently with and without the reply; "
            "cannot find where the response starts"
        )
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    boundary = len(prompt_text)
    # A token that starts inside the prompt (even if it straddles the boundary) is prompt.
    first = next((i for i, (start, _) in enumerate(offsets) if start >= boundary), len(ids))
    ends = [i for i in range(first, len(ids)) if ids[i] in eot_ids]
    if not ends:
        raise UserError(f"the chat template does not end the assistant turn with an end-of-turn token {sorted(eot_ids)}")
    ids = ids[: ends[-1] + 1]  # drop what follows the turn (ChatML's trailing newline)
    if ends[-1] <= first:
        raise UserError(f"a sample has an empty response after templating: {sample.prompt[:60]!r}")
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise UserError("the chat template and tokenizer both add BOS (double BOS); fix the template")
    labels = [IGNORE] * first + ids[first:]
    return Encoded(ids, labels)


def encode_samples(tokenizer, samples: list[Sample], eot_ids: set[int], max_len: int,
                   pairs: bool = False, family: Family | None = None) -> tuple[list[Encoded], int]:
    """Encode all samples; those longer than `max_len` tokens are dropped. Returns (kept, n_dropped).

    `pairs`: a sample whose meta holds a "rejected_response" also gets it encoded as its
    `rejected` side (dropped, not the sample, if that side is too long)."""
    encoded = []
    for s in samples:
        e = encode_sample(tokenizer, s, eot_ids, family)
        other = s.meta.get("rejected_response") if pairs else None
        if isinstance(other, str) and other.strip() and other.strip() != s.response.strip():
            r = encode_sample(tokenizer, Sample(s.prompt, other, system=s.system), eot_ids, family)
            e = Encoded(e.input_ids, e.labels, r if len(r.input_ids) <= max_len else None)
        encoded.append(e)
    kept = [e for e in encoded if len(e.input_ids) <= max_len]
    return kept, len(encoded) - len(kept)


def epoch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, batching: str) -> list[list[int]]:
    """Micro-batches (lists of sample indices) for one epoch, a pure function of its arguments.

    pack:   shuffle, then take `batch_size` samples per micro-batch (packed into one row).
    bucket: shuffle, sort by length (stable: equal lengths keep their shuffled order), cut into
            micro-batches of similar length, then shuffle the micro-batch order, so padding is
            small and the model still sees lengths in random order.
    """
    import torch

    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if batching == "bucket":
        order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if batching == "bucket":
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def shifted_targets(e: Encoded) -> list[int]:
    """targets[t] = the token position t must predict: labels[t+1], and nothing after the last token."""
    return e.labels[1:] + [IGNORE]


def collate_packed(batch: list[Encoded]) -> dict[str, torch.Tensor]:
    """One row holding every sample back to back; position ids restart at 0 for each sample."""
    import torch

    ids = [t for e in batch for t in e.input_ids]
    pos = [p for e in batch for p in range(len(e.input_ids))]
    tgt = [t for e in batch for t in shifted_targets(e)]
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "targets": torch.tensor([tgt]),
        **response_index([tgt]),
    }


def collate_padded(batch: list[Encoded], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """One right-padded row per sample, with an attention mask; pads have no target. The width
    is the longest sample's, rounded up to a multiple of `multiple` (a GPU's few shapes, layout.py)."""
    import torch

    longest = max(len(e.input_ids) for e in batch)
    width = -(-longest // multiple) * multiple
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in batch]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch]
    tgt = [shifted_targets(e) + [IGNORE] * (width - len(e.input_ids)) for e in batch]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "position_ids": torch.arange(width).expand(len(batch), width).contiguous(),
        "targets": torch.tensor(tgt),
        **response_index(tgt),
    }


def response_index(rows: list[list[int]]) -> dict:
    """Where the targets are, found here on the host: "response", their positions in the flattened
    rows (row-major, the order a boolean mask selects them in), and "row_targets", how many each row
    has. A GPU then selects them with an index instead of a mask, which would make it wait for the
    device to count them (a host-device sync per micro-batch)."""
    import torch

    flat, counts, offset = [], [], 0
    for row in rows:
        hits = [offset + t for t, x in enumerate(row) if x != IGNORE]
        flat += hits
        counts.append(len(hits))
        offset += len(row)
    return {"response": torch.tensor(flat, dtype=torch.long), "row_targets": counts}
