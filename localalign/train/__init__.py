"""The training stage: a LoRA adapter fine-tuned on the HF copy of the model.

config.py       TrainConfig: every setting, its default and the reason for it
lora.py         `train`: _setup, the loop, _finish
model.py        device and precision, the model with its adapter, the response-only loss
data.py         chat-template encoding, batch plans, collation (pure functions over token ids)
layout.py       how a step's samples become micro-batches on this device (CPU or GPU)
checkpoint.py   checkpoints and the adapter on disk, so a killed run resumes where it stopped
distributed.py  the few helpers for N processes under torchrun
merge.py        base + adapter folded into one HF directory (for export)
"""
