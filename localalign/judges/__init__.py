"""Judges: pure functions that read text without a model. Does a reply refuse (refusal.py)?
Which constraints does a request state, and does a reply meet them (constraints.py)?
Evaluation scores replies with them; the ISARA filters check generated pairs with them."""
