"""Atomic file writes for setokim and the tools (one implementation, in setok_tokenizer)."""

from setok_tokenizer.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    write_dir_atomically,
)

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "write_dir_atomically"]
