"""`ClassPatterns`: a vocabulary seen through a partition of the bytes into a few classes.

Some automata keep most of the vocabulary alive while changing state inside most tokens:
`len(X) < 40` counts UTF-8 starter bytes, `[^x]*` tracks the continuation bytes of every
multi-byte character, so no subtree of the trie can be skipped and a mask would walk the
whole trie. Such automata have few byte classes (bytes that lead every state to the same
state; `ByteDfa.byte_classes`), and a token's effect depends only on its string of
classes. The distinct class strings of a vocabulary form a much smaller trie (hundreds to
a few thousand nodes at 152k tokens), walked in full from any state in about a
millisecond; each token then reads the state of its class string.

The token automaton hands a trie walk over to the patterns when the walk grows past a
budget; the pattern trie is built once per (vocabulary, byte partition), without sorting
(a presence table per level), and shared: every `len(X)` bound uses the same one.
"""

from __future__ import annotations

import numpy as np

from lmq.constraints.vocabulary_cache import PATTERNS_SIZE, VocabularyCache
from lmq.constraints.vocabulary_index import VocabularyIndex


class ClassPatterns:
    """The trie of the class strings of a vocabulary's tokens, level by level."""

    def __init__(self, index: VocabularyIndex, byte_class: np.ndarray, classes: int):
        self.classes = classes
        self.parents: list[np.ndarray] = []      # per level: parent pattern (in the level above)
        self.labels: list[np.ndarray] = []       # per level: the class of the last byte
        levels, child_start = index.levels, index.child_start
        node_pattern = np.empty(index.node_count, dtype=np.int32)
        offset = 0
        above: np.ndarray | None = None
        for depth in range(1, index.depth + 1):
            first, last = int(levels[depth - 1]), int(levels[depth])
            key = byte_class[index.byte[first:last]]
            if above is not None:
                parent_first = int(levels[depth - 2])
                per_parent = np.diff(child_start[parent_first:first + 1])
                key = np.repeat(above, per_parent) * classes + key
            patterns, local = _distinct(key, len(self.parents[-1]) * classes if self.parents
                                        else classes)
            self.parents.append(patterns // classes)
            self.labels.append(patterns % classes)
            node_pattern[first:last] = local + offset
            above = local
            offset += len(patterns)
        self.size = offset
        by_position = np.append(node_pattern[index.terminal], offset)   # empty tokens: a pattern
        self.token_pattern = by_position[index.rank]                     # whose state stays DEAD

    def final_states(self, classed: np.ndarray, state: int) -> np.ndarray:
        """The state each token leads to from `state` (DEAD for empty tokens), given the
        automaton's table over classes (n_states, classes)."""
        flat = np.ascontiguousarray(classed, dtype=np.int32).ravel()
        classes = self.classes
        reached = np.empty(self.size + 1, dtype=np.int32)
        reached[-1] = 0
        start = 0
        level = flat[state * classes + self.labels[0]]
        for parents, labels in zip(self.parents, self.labels):
            if start:
                level = flat[level[parents] * classes + labels]
            reached[start:start + len(level)] = level
            start += len(level)
        return reached[self.token_pattern]


def _distinct(keys: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, index of each key among them) for keys in [0, space): a
    presence table when the key space is small (no sort), else `np.unique`."""
    if space > 4 * len(keys) + 4096:
        return np.unique(keys, return_inverse=True)
    present = np.zeros(space, dtype=bool)
    present[keys] = True
    position = np.cumsum(present, dtype=np.int32) - 1
    return np.flatnonzero(present), position[keys]


def class_patterns(index: VocabularyIndex, byte_class: np.ndarray,
                   cache: VocabularyCache) -> ClassPatterns:
    """The pattern trie of `index` under `byte_class` (256 class ids), built once per
    vocabulary (`cache` is the vocabulary's)."""
    classes = np.asarray(byte_class, dtype=np.intp)
    return cache.recent(cache.class_patterns, classes.astype(np.uint8).tobytes(),
                        lambda: ClassPatterns(index, classes, int(classes.max()) + 1), PATTERNS_SIZE)
