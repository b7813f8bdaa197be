"""Random strings of a byte automaton's language, for property tests (random walks)."""

from __future__ import annotations

import random

import numpy as np

from lmq.compiler.automaton import DEAD, ByteDfa


def sample(dfa: ByteDfa, rng: random.Random, stop: float = 0.3, limit: int = 40) -> bytes | None:
    """A random string reaching an accepting or exit state (None if the walk gets longer
    than `limit` bytes); ends at an accepting state with probability `stop`, always at an
    exit."""
    state, out = dfa.initial, bytearray()
    while state != DEAD and len(out) <= limit:
        if dfa.exits[state] or (dfa.accepting[state] and rng.random() < stop):
            return bytes(out)
        live = np.flatnonzero(dfa.transitions[state])
        if live.size == 0:
            return bytes(out) if dfa.accepting[state] else None
        byte = int(live[rng.randrange(live.size)])
        out.append(byte)
        state = int(dfa.transitions[state, byte])
    return None


def samples(dfa: ByteDfa, rng: random.Random, count: int, utf8: bool = False) -> list[bytes]:
    """Up to `count` distinct samples (only well-formed UTF-8 ones when `utf8`)."""
    found: set[bytes] = set()
    for _ in range(count * 20):
        data = sample(dfa, rng)
        if data is None:
            continue
        if utf8:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
        found.add(data)
        if len(found) == count:
            break
    return sorted(found)
