"""ISARA (Guo et al., arXiv 2401.06785): the model writes new pairs from retrieved examples alone.

retrieve.py  sentence embeddings and the nearest-neighbour index over samples
prompts.py   the few-shot conversation shown to the model, and parsing what it wrote back
filters.py   rules, novelty and the self-rating rubric (pure functions)
step.py      `generate_samples`: candidates, decoding, rules, novelty, rating, acceptance
"""
