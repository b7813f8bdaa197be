"""`VocabularyCache`: everything the engine derives from one vocabulary, in one object.

A vocabulary's index (its byte trie), llguidance's tokenizer, the class-pattern tries,
the token automata of regular constraints and the compiled grammar matchers are built
once per vocabulary and shared by every hole over it. The cache is keyed by the
vocabulary's identity (its equality would compare every token's bytes, and two loads of
one model are two vocabularies) and held weakly: it goes when its vocabulary does, so a
later vocabulary at the same address never sees it.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, TypeVar

from lmq.backends.base import Vocabulary
from lmq.constraints import disk_cache

if TYPE_CHECKING:
    from lmq.constraints.vocabulary_index import VocabularyIndex

#: token automata of regular constraints kept per vocabulary (all dropped past it)
AUTOMATA_SIZE = 256
#: grammar matchers kept ready per vocabulary (least recently used dropped past it)
MATCHERS_SIZE = 256
#: token automata of regular grammars kept per vocabulary (least recently used dropped
#: past it): each may hold tens of MiB of dense masks (a JSON document's string positions
#: are states of their own), so a server meeting many schemas stays bounded
GRAMMAR_AUTOMATA_SIZE = 8
#: class-pattern tries kept per vocabulary (least recently used dropped past it)
PATTERNS_SIZE = 16

T = TypeVar("T")


class VocabularyCache:
    """One vocabulary's derived structures; `lock` guards every dictionary of it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.index: VocabularyIndex | None = None
        self.tokenizer: Any = None                           # llguidance.LLTokenizer
        self.class_patterns: OrderedDict[bytes, Any] = OrderedDict()
        self.automata: dict[Hashable, Any] = {}
        self.matchers: OrderedDict[str, Any] = OrderedDict()
        self.grammar_automata: OrderedDict[str, Any] = OrderedDict()

    def automaton(self, key: Hashable, build: Callable[[], T]) -> T:
        """The token automaton under `key`, built once (masks computed for a state serve
        every later hole with the same constraint)."""
        with self.lock:
            automaton = self.automata.get(key)
        if automaton is None:
            automaton = build()
            with self.lock:
                if len(self.automata) >= AUTOMATA_SIZE:
                    self.automata.clear()
                self.automata[key] = automaton
        return automaton

    def recent(self, table: OrderedDict, key: Hashable, build: Callable[[], T], size: int) -> T:
        """`table[key]`, built on first use, keeping the `size` most recently used."""
        with self.lock:
            value = table.get(key)
            if value is not None:
                table.move_to_end(key)
                return value
        value = build()
        with self.lock:
            table[key] = value
            while len(table) > size:
                table.popitem(last=False)
        return value

    def clear_compiled(self) -> None:
        """Forget the constraints compiled over this vocabulary, keeping what belongs to
        the vocabulary itself (its index, tokenizer and class patterns)."""
        with self.lock:
            self.automata.clear()
            self.matchers.clear()
            self.grammar_automata.clear()


_caches: dict[int, tuple[weakref.ref, VocabularyCache]] = {}
_lock = threading.Lock()


def vocabulary_cache(vocabulary: Vocabulary) -> VocabularyCache:
    """The cache of `vocabulary` (made on first use)."""
    key = id(vocabulary)
    entry = _caches.get(key)
    if entry is not None and entry[0]() is vocabulary:
        return entry[1]
    with _lock:
        entry = _caches.get(key)
        if entry is not None and entry[0]() is vocabulary:
            return entry[1]
        cache = VocabularyCache()

        def forget(ref: weakref.ref) -> None:     # no lock: the collector may run inside it
            if _caches.get(key, (None,))[0] is ref:
                _caches.pop(key, None)

        _caches[key] = (weakref.ref(vocabulary, forget), cache)
        return cache


def clear_caches() -> None:
    """Forget every constraint the engine compiled in memory (languages, regexes,
    grammars, token automata, matchers), keeping what belongs to the vocabularies (their
    index, tokenizer and class patterns): a cold compile, as the bench times it. The disk
    entries written behind are waited for, so the disk then holds what a new process
    would find."""
    disk_cache.flush()
    for name, module in list(sys.modules.items()):
        if name.startswith("lmq.constraints."):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()
    for _, cache in list(_caches.values()):
        cache.clear_compiled()
