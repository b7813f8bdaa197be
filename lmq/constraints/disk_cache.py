"""The files the constraint engine keeps between runs, under `$XDG_CACHE_HOME/lmq` (else
`~/.cache/lmq`): vocabulary indexes (`vocabulary_index`) and compiled grammars
(`grammar_cache`).

A file is written to a temporary name and renamed into place, so a concurrent reader
sees either no file or a complete one; a file that cannot be read is rebuilt and
rewritten, one that cannot be written is skipped: the cache saves time, it is never
needed.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def cache_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmq")


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)`: to a temporary file in its directory, then
    renamed over it (nothing is written when the directory cannot be made)."""
    directory = os.path.dirname(path)
    try:
        try:
            handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        except FileNotFoundError:        # made only when missing: a mkdir costs as much as a write
            os.makedirs(directory, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
