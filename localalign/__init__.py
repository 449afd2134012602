"""localalign: self-align a small language model offline from a handful of examples (ISARA)."""

__version__ = "0.1.0"
