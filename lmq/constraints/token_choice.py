"""Applying a step's mask to a logits row and choosing a token: the per-token contract.

A decoding step has a float32 logits row (read, never written: the backend's row), the
state's `TokenMask` (None: every token), the ids to `allow` besides the mask (the end
tokens where the value may end: end tokens are never in a mask) and the ids `hidden`
(the end tokens where it may not; needed where there is no mask). The step's candidates
are the mask's tokens plus `allow`, less `hidden`; every other token has probability 0.
Id arrays are sorted int64 (other dtypes are converted on each call).

- `choose`: the highest-scoring candidate (the lowest id on ties; -1 when no candidate
  has a finite score) and a function giving its log-probability among the candidates;
- `best`: the same choice with the log-normalizer (log Σ exp over the candidates) summed
  in the same call, on request;
- `candidates`: the candidates' scores, for a decoder choosing otherwise (sampling knobs,
  beam search): gathered with their ids (sparse mask) or a row with the rest at -inf;
- `draw` / `draw_rows`: a plain draw from softmax(row / temperature) with `hidden` left
  out, for a uniform number the caller's random stream gave (several rows in one call);
- `log_normalizer`: log Σ exp of a plain row.

Each runs in the compiled kernel (`_kernel.c`, built by setup.py, vectorised: the choice
and its normalizer in one pass over the row with AVX-512, in two with AVX2 or the
baseline) when it is built, else in numpy
with the same result: the same tokens (a draw may differ only where its uniform number
falls within rounding of a boundary), normalizers within 1e-5 relative. `LMQ_NO_KERNEL=1`
in the environment forces numpy.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:         # only a type here: the modules building masks import this one
    from lmq.constraints.token_masks import TokenMask

try:
    from lmq.constraints import _kernel as _compiled
except ImportError:                    # built without a C compiler: numpy does the work
    _compiled = None

#: whether the compiled kernel was built in this install
KERNEL_BUILT = _compiled is not None
#: the kernel in use (None: numpy, for want of a build or under LMQ_NO_KERNEL=1)
KERNEL = None if os.environ.get("LMQ_NO_KERNEL", "") not in ("", "0") else _compiled
#: a dense mask allowing less than this fraction of the vocabulary has the kernel sum its
#: normalizer over its candidates compacted (measured at V = 151,936: compacting costs
#: about as much as summing the blocked quarter of a row)
COMPACT_FRACTION = 3 / 4
#: entries per block of numpy's draw (block sums, then one block's cumulative sum)
DRAW_BLOCK = 256

_NO_IDS = np.empty(0, dtype=np.int64)
_buffers = threading.local()           # numpy's scratch rows, per thread


def choose(row: np.ndarray, mask: TokenMask | None = None, allow: np.ndarray | None = None,
           hidden: np.ndarray | None = None) -> tuple[int, Callable[[], float]]:
    """The best candidate and a function giving its log-probability among the
    candidates (-1, and a function giving 0, when there is none). The kernel sums the
    normalizer in the same call (one more pass, no copy of the row); numpy sums it when
    the function is called, on its own copy of the candidates (the backend rewrites the
    row at its next decode), so a caller calling it while the engine evaluates the next
    token hides the cost."""
    if KERNEL is not None or mask is not None and mask.bits is None:
        token, normalizer = best(row, mask, allow, hidden, True)
        if token < 0:
            return -1, _nothing
        chosen = row.item(token) - normalizer
        return token, lambda: chosen
    values, ids = candidates(row, mask, allow, hidden, np.empty_like(row))
    token = int(values.argmax())
    chosen = float(values[token])
    if chosen == -np.inf:
        return -1, _nothing
    return token, lambda: chosen - _numpy_log_normalizer(values, chosen)


def best(row: np.ndarray, mask: TokenMask | None = None, allow: np.ndarray | None = None,
         hidden: np.ndarray | None = None, normalizer: bool = False) -> tuple[int, float | None]:
    """(the best candidate or -1, log Σ exp over the candidates where `normalizer` is
    asked for, else None; -inf when there is no candidate)."""
    kernel = KERNEL
    if kernel is not None:
        if mask is None:
            ids = bits = None
            compact = False
        else:
            bits = mask.bits
            ids = mask.allowed if bits is None else None
            compact = bits is not None and mask.count < COMPACT_FRACTION * mask.size
        try:                           # the usual buffers, taken as they are
            return kernel.best(row, ids, bits, allow, hidden, normalizer, compact)
        except (TypeError, ValueError):     # another dtype, not contiguous: converted
            return kernel.best(_floats(row), ids, bits, _ids(allow), _ids(hidden), normalizer, compact)
    allow, hidden = _ids(allow), _ids(hidden)
    values, ids = candidates(row, mask, allow, hidden, _scratch(row))
    if not len(values):
        return -1, -np.inf if normalizer else None
    index = int(values.argmax())
    top = float(values[index])
    if top == -np.inf:
        return -1, -np.inf if normalizer else None
    return (int(ids[index]) if ids is not None else index,
            _numpy_log_normalizer(values, top) if normalizer else None)


def candidates(row: np.ndarray, mask: TokenMask | None, allow: np.ndarray | None,
               hidden: np.ndarray | None, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores, their token ids) of the candidates, ids ascending, for a sparse mask;
    else (`out` = `row` with every other token at -inf, None). `row` is not written."""
    allow, hidden = _ids(allow), _ids(hidden)
    if mask is not None and not mask.dense:
        ids = mask.allowed
        if allow is not None and len(allow):
            ids = np.union1d(ids, allow)
        if hidden is not None and len(hidden):
            ids = ids[~np.isin(ids, hidden)]
        return row[ids], ids
    if KERNEL is not None:
        KERNEL.masked(_floats(row), mask.bits if mask is not None else None, allow, hidden, out)
        return out, None
    if mask is None:
        np.copyto(out, row)
    else:
        np.add(row, mask.bias, out=out)
    if allow is not None:
        out[allow] = row[allow]
    if hidden is not None:
        out[hidden] = -np.inf
    return out, None


def log_normalizer(row: np.ndarray) -> float:
    """log Σ exp(row), stable (-inf for an empty or all -inf row; float64 rows are summed
    in numpy at their own precision)."""
    if KERNEL is not None and row.dtype == np.float32:
        return KERNEL.best(_floats(row), None, None, None, None, True, False)[1]
    if not len(row):
        return -math.inf
    return _numpy_log_normalizer(row, float(row.max()))


def draw(row: np.ndarray, u: float, temperature: float = 1.0,
         hidden: np.ndarray | None = None) -> tuple[int, float]:
    """(the entry of softmax(row / temperature) that the uniform number `u` in [0, 1)
    picks by inverse CDF, -1 when every weight is 0; top + log Σ exp((row - top) /
    temperature) with `top` the highest score drawn from: the row's log-normalizer at
    temperature 1). -inf and `hidden` entries weigh 0 and are never drawn."""
    return draw_rows([row], [u], [hidden], temperature)[0]


def draw_rows(rows: Sequence[np.ndarray], us: Sequence[float],
              hiddens: Sequence[np.ndarray | None], temperature: float = 1.0) -> list[tuple[int, float]]:
    """`draw` on each row with its own uniform number and hidden ids, in one call."""
    if KERNEL is not None:
        return KERNEL.draw([_floats(r) for r in rows], [_ids(h) for h in hiddens],
                           [float(u) for u in us], float(temperature))
    return [_numpy_draw(r, u, temperature, _ids(h)) for r, u, h in zip(rows, us, hiddens)]


@contextmanager
def numpy_fallback() -> Iterator[None]:
    """numpy instead of the kernel while active (tests and the bench compare the two;
    not for use while other threads decode)."""
    global KERNEL
    saved, KERNEL = KERNEL, None
    try:
        yield
    finally:
        KERNEL = saved


def _numpy_draw(row: np.ndarray, u: float, temperature: float,
                hidden: np.ndarray | None) -> tuple[int, float]:
    """numpy's draw in three passes over the row in reused buffers: exponentials, their
    sums per block of `DRAW_BLOCK` (a matrix-vector product: BLAS sums blocks several
    times faster than a reduction), then a search among the block sums and inside one
    block (a cumulative sum over the whole row is the slow part of a plain draw)."""
    size = row.shape[0]
    padded = _scratch(row, "weights", -(-size // DRAW_BLOCK) * DRAW_BLOCK)
    padded[size:] = 0.0
    weights = padded[:size]
    if hidden is not None:
        np.copyto(weights, row)
        weights[hidden] = -np.inf
        top = weights.max()
    else:
        top = row.max()
    if not size or top == -np.inf:
        return -1, -math.inf
    np.subtract(row, top, out=weights)
    if temperature != 1:
        np.multiply(weights, np.float32(1 / temperature), out=weights)
    np.exp(weights, out=weights)
    if hidden is not None:
        weights[hidden] = 0.0
    blocks = np.cumsum(padded.reshape(-1, DRAW_BLOCK) @ _ones(), dtype=np.float64)
    total = float(blocks[-1])
    if total == 0.0:
        return -1, -math.inf
    target = u * total
    block = min(int(np.searchsorted(blocks, target, side="right")), blocks.size - 1)
    start = block * DRAW_BLOCK
    inside = np.cumsum(padded[start:start + DRAW_BLOCK], dtype=np.float64)
    offset = int(np.searchsorted(inside, target - (blocks[block - 1] if block else 0.0), side="right"))
    if offset >= DRAW_BLOCK or padded[start + offset] == 0:      # rounding at the edge
        offset = int(np.flatnonzero(padded[start:start + DRAW_BLOCK])[-1])
    return start + offset, float(top) + math.log(total)


def _numpy_log_normalizer(values: np.ndarray, top: float) -> float:
    if top == -np.inf:
        return -math.inf
    spare = _scratch(values, "spare") if values.dtype == np.float32 else None
    shifted = np.subtract(values, values.dtype.type(top), out=spare)
    return top + math.log(float(np.exp(shifted, out=shifted).sum(dtype=np.float64)))


def _scratch(row: np.ndarray, name: str = "row", size: int | None = None) -> np.ndarray:
    """A float32 buffer of this thread, `size` (default: the row's) entries long."""
    size = row.shape[0] if size is None else size
    buffer = getattr(_buffers, name, None)
    if buffer is None or buffer.shape[0] != size:
        buffer = np.empty(size, dtype=np.float32)
        setattr(_buffers, name, buffer)
    return buffer


def _ones() -> np.ndarray:
    ones = getattr(_buffers, "ones", None)
    if ones is None:
        ones = _buffers.ones = np.ones(DRAW_BLOCK, dtype=np.float32)
    return ones


def _ids(ids: np.ndarray | None) -> np.ndarray | None:
    if ids is None or (ids.dtype == np.int64 and ids.flags.c_contiguous):
        return ids
    return np.ascontiguousarray(ids, dtype=np.int64)


def _floats(row: np.ndarray) -> np.ndarray:
    if row.dtype == np.float32 and row.flags.c_contiguous:
        return row
    return np.ascontiguousarray(row, dtype=np.float32)


def _nothing() -> float:
    return 0.0


__all__ = ["KERNEL", "KERNEL_BUILT", "best", "candidates", "choose", "draw", "draw_rows",
           "log_normalizer", "numpy_fallback"]
