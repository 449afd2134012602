"""Checks where formats cross: is this file what it claims, and are two forms the same model?

hf_files.py  an HF directory, checked before anything heavy loads it
parity.py    a GGUF against its HF model (tokens, special ids, template, stop tokens, logits),
             with the tolerances measured for each file type; also the HF copy of a GGUF
"""
