"""Random strings of a byte automaton's language, for property tests: random walks that
pick the next state uniformly (then a byte leading there), so that rare bytes such as the
one completing a `contains` phrase are reached as often as common ones."""

from __future__ import annotations

import random

import numpy as np

from lmq.constraints.byte_dfa import DEAD, ByteDfa, any_bytes, valid_utf8


def sample(dfa: ByteDfa, rng: random.Random, stop: float = 0.3, limit: int = 40,
           utf8: bool = False) -> bytes | None:
    """A random string reaching an accepting or exit state (None if the walk gets longer
    than `limit` bytes); ends at an accepting state with probability `stop`, always at an
    exit. With `utf8`, the walk only takes bytes that keep the string well-formed UTF-8
    (run in step with `valid_utf8()`) and ends only between characters."""
    chars = valid_utf8() if utf8 else any_bytes()
    state, char_state, out = dfa.initial, chars.initial, bytearray()
    while state != DEAD and len(out) <= limit:
        boundary = bool(chars.accepting[char_state])
        if boundary and (dfa.exits[state] or (dfa.accepting[state] and rng.random() < stop)):
            return bytes(out)
        live = np.flatnonzero((dfa.transitions[state] != DEAD)
                              & (chars.transitions[char_state] != DEAD))
        if live.size == 0:
            return bytes(out) if boundary and dfa.accepting[state] else None
        targets = dfa.transitions[state, live] * chars.n_states + chars.transitions[char_state, live]
        chosen = rng.choice(sorted(set(targets.tolist())))    # each next state alike, then
        choices = live[targets == chosen]                    # any byte that leads there
        byte = int(choices[rng.randrange(choices.size)])
        out.append(byte)
        state = int(dfa.transitions[state, byte])
        char_state = int(chars.transitions[char_state, byte])
    return None


def samples(dfa: ByteDfa, rng: random.Random, count: int, utf8: bool = False) -> list[bytes]:
    """Up to `count` distinct samples (only well-formed UTF-8 ones when `utf8`)."""
    found: set[bytes] = set()
    for _ in range(count * 20):
        data = sample(dfa, rng, utf8=utf8)
        if data is None:
            continue
        found.add(data)
        if len(found) == count:
            break
    return sorted(found)
