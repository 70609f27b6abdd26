"""kvfs: a token warehouse for LLM KV caches, presented as a FUSE filesystem."""

__version__ = "0.1.0"
