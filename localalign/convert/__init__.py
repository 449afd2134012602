"""Format crossings, without policy: what is written where is decided by the callers.

hf_reader.py    an HF directory read as llama.cpp needs it (config, RoPE, vocabulary, template)
gguf_writer.py  HF -> f32/f16/bf16 GGUF
quantize.py     GGUF -> q8_0, q4_k_m, ... (llama.cpp's quantizer, in-process)
lora_writer.py  PEFT LoRA -> GGUF LoRA adapter
gguf_to_hf.py   GGUF -> HF directory (transformers' GGUF reader)
"""
