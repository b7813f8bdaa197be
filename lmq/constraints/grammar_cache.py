"""Compiled grammars on disk: a JSON schema's GBNF, and a GBNF grammar's llguidance form.

The first `JSON(X, schema)` of a schema costs milliseconds before llguidance sees it:
llama.cpp's schema converter writes GBNF, lmq checks the GBNF and translates it into
llguidance's Lark dialect, choosing its lexemes (`lmq.constraints.llguidance_lark`).
Both results depend only on the text they come from, and on what made them (lmq's
format, the llama-cpp-python and llguidance versions, the grammar limits), never on the
vocabulary, so they are kept across runs under a hash of all of that, one small file per
entry: `<cache>/grammars/<kind>-<hash>.json` holding the whole key and the value. The
key is compared on reading, so a hash collision or a stale or foreign file is a miss.
llguidance's own compile (per vocabulary) cannot be stored and runs in every process.

Entries are never removed by lmq (a few kB each); deleting the directory is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, TypeVar

from lmq.constraints import disk_cache, limits

#: bump when lmq's GBNF check, Lark translation or DFA encoding changes: older entries
#: are then ignored
FORMAT_VERSION = 2
_made_by: str | None = None

T = TypeVar("T")


def cached(kind: str, text: str, build: Callable[[], T],
           encode: Callable[[T], str] = str, decode: Callable[[str], T] = str) -> T:
    """The `kind` entry of `text` (a schema's canonical JSON, a grammar's GBNF): read
    from disk and `decode`d, else `build()` and stored as `encode` of it, written behind
    the caller (`disk_cache.write_behind`, which encodes it too). An error from `build`
    is not cached; an entry that cannot be decoded is a miss."""
    key = _key(kind, text)
    path = os.path.join(disk_cache.cache_directory(), "grammars",
                        f"{kind}-{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.json")
    stored = disk_cache.read(path)
    if stored is not None:
        try:
            entry = json.loads(stored)
            if entry["key"] == key and isinstance(entry["value"], str):
                return decode(entry["value"])
        except (ValueError, KeyError, TypeError):
            pass                          # unreadable or not this entry: rebuilt
    value = build()
    disk_cache.write_behind(path, lambda: json.dumps({"key": key, "value": encode(value)},
                                                     ensure_ascii=False).encode("utf-8"))
    return value


def _key(kind: str, text: str) -> str:
    global _made_by
    if _made_by is None:
        _made_by = f"lmq-grammars-{FORMAT_VERSION} " + " ".join(
            f"{package}-{_version(package)}" for package in ("llama-cpp-python", "llguidance"))
    return (f"{_made_by} rules<={limits.MAX_GRAMMAR_RULES} depth<={limits.MAX_GRAMMAR_DEPTH} "
            f"{kind}\n{text}")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"
