"""Format crossings, without policy: what is written where is decided by the callers.

converter.py        HF -> GGUF and PEFT LoRA -> GGUF LoRA, with llama.cpp's own converters in a
                    child process (converter_child.py is that child; it is never imported)
quantize.py         GGUF -> q8_0, q4_k_m, ... (llama.cpp's quantizer, in-process)
gguf_to_hf.py       GGUF -> HF directory (transformers' GGUF reader), keeping the GGUF's tokenizer
"""
