"""`VocabularyIndex`: a vocabulary's token bytes as a byte trie in flat numpy arrays.

The constraint engine computes, for a byte automaton state, which tokens can be walked
without dying. Walking every token separately would be a Python loop over the vocabulary;
the trie shares common prefixes, and its breadth-first layout lets a mask be computed a
whole level at a time with numpy gathers (see `lmq.constraints.token_masks`).

Layout. Tokens with non-empty bytes are sorted by their bytes (`order`: sorted position →
token id). Every distinct non-empty prefix is a node; nodes are numbered level by level
(depth 1 first), and within a level by sorted position, so that

- the nodes of depth d are the contiguous ids `levels[d - 1] : levels[d]`, and the
  children of a node the contiguous ids `child_start[n] : child_start[n + 1]`;
- the tokens having a node's prefix are the contiguous sorted positions `lo[n] : hi[n]`,
  of which the first `exact[n]` are exactly the prefix (several ids may share bytes);
- `below[:, n]` summarizes which bytes occur anywhere under a node (as `BYTE_GROUP`
  bits), so that a walk can take a whole subtree at once when its state loops on them;
  `above[:, n]` the bytes of its prefix, and `token_groups` (read through `terminal`)
  every byte of each token, so that a walk can filter a subtree's tokens at once when
  its state only loops or dies.

Building takes a few hundred milliseconds at 150k tokens, so the arrays are cached on
disk, keyed by a hash of the token bytes (`$XDG_CACHE_HOME/lmq`, else `~/.cache/lmq`).
"""

from __future__ import annotations

import functools
import hashlib
import marshal
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from lmq.backends.base import Vocabulary
from lmq.constraints.disk_cache import cache_directory, write_atomically
from lmq.constraints.vocabulary_cache import vocabulary_cache

#: bump when the layout or the build changes: old cache files are then ignored
FORMAT_VERSION = 8


def _byte_groups() -> np.ndarray:
    """Byte → group: each printable ASCII byte, tab, newline and carriage return alone; the
    other control bytes; UTF-8 continuation bytes; lead bytes of 2, 3 and 4-byte forms.
    A node summarizes the bytes below it as 103 group bits (two words instead of four):
    enough to see that a subtree holds only bytes a DFA state loops on."""
    group = np.full(256, 98, dtype=np.int64)
    group[0x20:0x7F] = np.arange(95)
    group[[0x09, 0x0A, 0x0D]] = (95, 96, 97)
    group[0x80:0xC0], group[0xC0:0xE0], group[0xE0:0xF0], group[0xF0:] = 99, 100, 101, 102
    return group


BYTE_GROUP = _byte_groups()
#: the group bit of each byte, as two words (low word row, high word row)
GROUP_BITS = np.zeros((2, 256), dtype=np.uint64)
GROUP_BITS[BYTE_GROUP // 64, np.arange(256)] = np.left_shift(
    np.uint64(1), (BYTE_GROUP % 64).astype(np.uint64))
_ARRAYS = ("order", "rank", "levels", "byte", "child_start", "lo", "hi", "exact", "terminal",
           "below", "above")


@dataclass(frozen=True, eq=False)
class VocabularyIndex:
    """The trie of one vocabulary's token bytes (flat arrays, see the module docstring)."""

    size: int                 # vocabulary size V (token ids are 0 … V-1)
    order: np.ndarray         # int32 (T,): sorted position → token id, non-empty tokens only
    rank: np.ndarray          # int32 (V,): token id → sorted position (T for empty tokens)
    levels: np.ndarray        # int32 (D+1,): the nodes of depth d are levels[d-1]:levels[d]
    byte: np.ndarray          # int32 (N,): the last byte of each node's prefix
    child_start: np.ndarray   # int32 (N+1,): children of node n are child_start[n]:child_start[n+1]
    lo: np.ndarray            # int32 (N,): first sorted position with the node's prefix
    hi: np.ndarray            # int32 (N,): one past the last such position
    exact: np.ndarray         # int32 (N,): how many tokens are exactly the node's prefix
    terminal: np.ndarray      # int32 (T,): the node whose prefix is the token at each position
    below: np.ndarray         # uint64 (2, N): the byte groups (`BYTE_GROUP`) of every node
                              # below n, as bits in two words (0 for a leaf)
    above: np.ndarray         # uint64 (2, N): the byte groups of n's prefix (its own byte
                              # and every byte above it)

    @property
    def node_count(self) -> int:
        return len(self.byte)

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    @functools.cached_property
    def views(self) -> tuple[memoryview, ...]:
        """(byte, child_start, lo, hi, exact, below low word, below high word, above low
        word, above high word) as memoryviews: indexing one gives a Python int, the fast
        path of small walks."""
        return tuple(memoryview(np.ascontiguousarray(array)) for array in (
            self.byte, self.child_start, self.lo, self.hi, self.exact, *self.below, *self.above))

    @functools.cached_property
    def token_groups(self) -> np.ndarray:
        """uint64 (2, T): the byte groups of every byte of the token at each sorted position."""
        return np.ascontiguousarray(self.above[:, self.terminal])

    @functools.cached_property
    def byte_kinds(self) -> tuple[np.ndarray, np.ndarray]:
        """(bytes that are a token of their own, bytes found in any token), bool per byte."""
        first = int(self.levels[1]) if self.depth else 0
        single = np.zeros(256, dtype=bool)
        single[self.byte[:first][self.exact[:first] > 0]] = True
        present = np.zeros(256, dtype=bool)
        present[self.byte] = True
        return single, present

    @staticmethod
    def build(token_bytes: tuple[bytes, ...]) -> "VocabularyIndex":
        """Build the trie from token bytes (vectorized apart from one sort)."""
        size = len(token_bytes)
        lengths = np.fromiter(map(len, token_bytes), dtype=np.int64, count=size)
        ids = sorted(np.flatnonzero(lengths).tolist(), key=token_bytes.__getitem__)
        order = np.asarray(ids, dtype=np.int32)
        count = len(order)
        rank = np.full(size, count, dtype=np.int32)
        rank[order] = np.arange(count, dtype=np.int32)
        joined = np.frombuffer(b"".join(token_bytes[t] for t in ids), dtype=np.uint8)
        length = lengths[order]
        start = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(length, out=start[1:])
        common = _common_prefixes(joined, start, length)

        # a token at sorted position i creates the nodes of depths common[i]+1 … length[i]
        fresh = length - common
        node_pos = np.repeat(np.arange(count), fresh)
        node_depth = concatenated_ranges(common + 1, fresh)
        by_level = np.argsort(node_depth.astype(np.uint16) if node_depth.max(initial=0) < 65536
                              else node_depth, kind="stable")
        node_pos = node_pos[by_level]
        node_depth = node_depth[by_level]
        nodes = len(node_pos)
        byte = joined[start[node_pos] + node_depth - 1].astype(np.int32)

        # children of node (i, d): the level-(d+1) nodes created at positions ≥ i, up to the
        # next node of level d (keys (d, i) are increasing in node order)
        key = node_depth * (count + 1) + node_pos
        child_start = np.empty(nodes + 1, dtype=np.int64)
        child_start[:nodes] = np.searchsorted(key, (node_depth + 1) * (count + 1) + node_pos)
        child_start[nodes] = nodes
        # the node holding each token (a duplicate's bytes are its predecessor's node)
        ends_here = node_depth == length[node_pos]
        exact = np.zeros(nodes, dtype=np.int64)
        terminal = np.flatnonzero(ends_here)
        owner = np.maximum.accumulate(np.where(fresh > 0, np.arange(count), 0))
        terminal_of_position = np.empty(count, dtype=np.int64)
        terminal_of_position[node_pos[terminal]] = terminal
        np.add.at(exact, terminal_of_position[owner], 1)
        depth = int(node_depth.max(initial=0))
        levels = np.searchsorted(node_depth, np.arange(1, depth + 2))
        hi = node_pos + _subtree_token_counts(exact, child_start, levels)
        int32 = functools.partial(np.asarray, dtype=np.int32)
        return VocabularyIndex(
            size=size, order=order, rank=rank, levels=int32(levels), byte=byte,
            child_start=int32(child_start), lo=int32(node_pos), hi=int32(hi),
            exact=int32(exact), terminal=int32(terminal_of_position[owner]),
            below=_groups_below(byte, child_start, levels),
            above=_groups_above(byte, child_start, levels))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _ARRAYS}


def _common_prefixes(joined: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Length of the common prefix of each sorted token with its predecessor (0 for the
    first), compared one byte column at a time over the pairs still equal."""
    count = len(length)
    common = np.zeros(count, dtype=np.int64)
    if count < 2:
        return common
    limit = np.minimum(length[1:], length[:-1])
    active = np.arange(1, count)
    depth = 0
    while active.size:
        active = active[limit[active - 1] > depth]
        same = joined[start[active] + depth] == joined[start[active - 1] + depth]
        active = active[same]
        depth += 1
        common[active] = depth
    return common


def concatenated_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + c) for s, c in zip(starts, counts)), vectorized."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(starts - (ends - counts), counts) + np.arange(total, dtype=starts.dtype)


def _subtree_token_counts(exact: np.ndarray, child_start: np.ndarray,
                          levels: np.ndarray) -> np.ndarray:
    """Tokens in each node's subtree, summed bottom-up one level at a time."""
    subtree = exact.copy()
    for d in range(len(levels) - 2, 0, -1):
        first, last, below_end = levels[d - 1], levels[d], levels[d + 1]
        below = np.concatenate(([0], np.cumsum(subtree[last:below_end])))
        subtree[first:last] += (below[child_start[first + 1:last + 1] - last]
                                - below[child_start[first:last] - last])
    return subtree


def _groups_below(byte: np.ndarray, child_start: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Per node, the bits of the byte groups found anywhere below it, OR-ed bottom-up one
    level at a time (a node's value: its children's bytes and their own values)."""
    below = np.zeros((len(byte), 2), dtype=np.uint64)
    bits = GROUP_BITS.T[byte]
    children = np.diff(child_start)
    for d in range(len(levels) - 2, 0, -1):
        first, last, end = levels[d - 1], levels[d], levels[d + 1]
        value = below[last:end] | bits[last:end]
        parents = np.arange(first, last)[children[first:last] > 0]
        below[parents] = np.bitwise_or.reduceat(value, child_start[parents] - last, axis=0)
    return np.ascontiguousarray(below.T)


def _groups_above(byte: np.ndarray, child_start: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Per node, the bits of the byte groups of its prefix, OR-ed top-down one level at a
    time (a node's value: its parent's and its own byte's)."""
    above = np.ascontiguousarray(GROUP_BITS[:, byte])
    children = np.diff(child_start)
    for d in range(1, len(levels) - 1):
        first, last, end = levels[d - 1], levels[d], levels[d + 1]
        parents = np.repeat(np.arange(first, last), children[first:last])
        above[:, last:end] |= above[:, parents]
    return above


def vocabulary_key(token_bytes: tuple[bytes, ...]) -> str:
    """A hash of the token bytes. `marshal` writes each token's length before its bytes,
    so two vocabularies that join to the same bytes but split them differently differ."""
    digest = hashlib.blake2b(marshal.dumps(tuple(token_bytes)), digest_size=16)
    return f"v{FORMAT_VERSION}-{digest.hexdigest()}"


def _load(path: str, size: int) -> VocabularyIndex | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in _ARRAYS}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None                       # missing or unreadable: rebuilt and rewritten
    return VocabularyIndex(size=size, **arrays)


def vocabulary_index(vocabulary: Vocabulary, *, use_disk_cache: bool = True) -> VocabularyIndex:
    """The index of `vocabulary`: shared in process, else read from the disk cache, else
    built (and cached on disk)."""
    cache = vocabulary_cache(vocabulary)
    if cache.index is not None:
        return cache.index
    index = None
    path = os.path.join(cache_directory(), vocabulary_key(vocabulary.token_bytes) + ".npz")
    if use_disk_cache:
        index = _load(path, vocabulary.size)
    if index is None:
        index = VocabularyIndex.build(vocabulary.token_bytes)
        if use_disk_cache:
            write_atomically(path, lambda f: np.savez(f, **index.arrays()))
    with cache.lock:
        if cache.index is None:
            cache.index = index
        return cache.index
