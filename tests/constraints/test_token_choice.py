"""The per-token step (lmq/constraints/token_choice.py): the compiled kernel and the numpy
fallback against a float64 reference written from the definitions, and against each
other on the real SmolLM2 (whole queries in subprocesses with and without
LMQ_NO_KERNEL=1)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmq.constraints import token_choice
from lmq.constraints.token_masks import TokenMask
from subprocess_env import lmq_env

needs_kernel = pytest.mark.skipif(not token_choice.KERNEL_BUILT,
                                  reason="checked by test_the_kernel_is_built_in_this_install")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# scores with many ties, -inf entries and a wide range
SCORES = st.sampled_from([-np.inf, -90.0, -3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 7.25, 30.0])


@st.composite
def steps(draw):
    """(row, mask or None, allow ids or None, hidden ids or None): sizes around the
    kernel's 32-token words and 256-token draw blocks, masks of every density."""
    size = draw(st.integers(1, 700))
    row = np.array(draw(st.lists(SCORES, min_size=size, max_size=size)), dtype=np.float32)
    if draw(st.booleans()):
        row += np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(size).astype(np.float32)
    density = draw(st.sampled_from([None, 0.0, 0.01, 0.3, 0.7, 0.97, 1.0]))
    mask = None
    if density is not None:
        flags = np.random.default_rng(draw(st.integers(0, 2**16))).random(size) < density
        mask = TokenMask.of_flags(flags)
    ids = st.lists(st.integers(0, size - 1), max_size=4, unique=True).map(
        lambda chosen: np.array(sorted(chosen), dtype=np.int64))
    allow = draw(st.none() | ids)
    hidden = draw(st.none() | ids)
    return row, mask, allow, hidden


def reference(row, mask, allow, hidden):
    """(best candidate or -1, log Σ exp over the candidates) in float64, from the
    definition: the mask's tokens (all without one) plus `allow`, less `hidden`."""
    keep = np.ones(len(row), dtype=bool) if mask is None else mask.flags
    if allow is not None:
        keep[allow] = True
    if hidden is not None:
        keep[hidden] = False
    values = np.where(keep, row.astype(np.float64), -np.inf)
    if not keep.any() or values.max() == -np.inf:
        return -1, -math.inf
    top = values.max()
    return int(np.flatnonzero(values == top)[0]), top + math.log(np.exp(values - top).sum())


def every_way(action) -> list:
    """`action()` with the kernel's loops for each instruction set this CPU runs, then
    with numpy (last)."""
    results = []
    if token_choice.KERNEL_BUILT:
        from lmq.constraints import _kernel
        best = _kernel.instructions
        try:
            for name in _kernel.available:
                _kernel.use(name)
                results.append(action())
        finally:
            _kernel.use(best)
    with token_choice.numpy_fallback():
        results.append(action())
    return results


def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)


@needs_kernel
def test_the_kernel_is_in_use_unless_lmq_no_kernel_is_set():
    assert (token_choice.KERNEL is None) == (os.environ.get("LMQ_NO_KERNEL", "") not in ("", "0"))
    probe = "from lmq.constraints import token_choice; print(token_choice.KERNEL is None)"
    env = lmq_env(LMQ_NO_KERNEL="1")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_the_kernel_is_built_in_this_install():
    """CI installs with `pip install -e .`: a silent fallback to numpy fails here. The
    property tests run the loops of every instruction set the CPU has."""
    from lmq.constraints import _kernel
    assert _kernel.instructions == _kernel.available[0] and "baseline" in _kernel.available
    with pytest.raises(ValueError, match="not available"):
        _kernel.use("sse1")


@SETTINGS
@given(steps())
def test_best_and_choose_agree_with_the_reference_on_kernel_and_numpy(step):
    row, mask, allow, hidden = step
    expected_token, expected_normalizer = reference(row, mask, allow, hidden)
    before = row.copy()
    for token, normalizer in every_way(lambda: token_choice.best(row, mask, allow, hidden, normalizer=True)):
        assert token == expected_token
        assert close(normalizer, expected_normalizer) or normalizer == expected_normalizer == -math.inf
    for token, logprob in every_way(lambda: token_choice.choose(row, mask, allow, hidden)):
        assert token == expected_token
        expected = 0.0 if token < 0 else float(row[token]) - expected_normalizer
        assert close(logprob(), expected)
    assert np.array_equal(row, before)                 # the backend's row is never written


@SETTINGS
@given(steps())
def test_candidates_are_the_same_scores_on_kernel_and_numpy(step):
    row, mask, allow, hidden = step
    *kernel, (numpy_values, numpy_ids) = every_way(
        lambda: tuple(np.copy(a) if a is not None else None
                      for a in token_choice.candidates(row, mask, allow, hidden, np.empty_like(row))))
    for kernel_values, kernel_ids in kernel:
        assert np.array_equal(kernel_values, numpy_values)
        assert (kernel_ids is None) == (numpy_ids is None)
        if kernel_ids is not None:
            assert np.array_equal(kernel_ids, numpy_ids)
    full = numpy_values
    if numpy_ids is not None:
        full = np.full(len(row), -np.inf, dtype=np.float32)
        full[numpy_ids] = numpy_values
    token, normalizer = reference(row, mask, allow, hidden)
    assert token == (int(np.argmax(full)) if full.max() > -np.inf else -1)
    assert close(token_choice.log_normalizer(full), normalizer) or normalizer == -math.inf


@needs_kernel
@SETTINGS
@given(steps(), st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=8, max_size=8),
       st.sampled_from([1.0, 0.6, 1.7]))
def test_the_same_uniform_numbers_draw_the_same_tokens_on_kernel_and_numpy(step, us, temperature):
    row, _, _, hidden = step
    allowed = np.isfinite(row)
    if hidden is not None:
        allowed[hidden] = False
    if allowed.any():           # u away from the boundaries, where rounding may decide
        scaled = np.where(allowed, row.astype(np.float64), -np.inf) / temperature
        cumulative = np.cumsum(np.exp(scaled - scaled.max()))
        bounds = np.concatenate(([0.0], cumulative / cumulative[-1]))
        us = [u for u in us if np.abs(bounds - u).min() > 1e-5]
    for u in us:
        *kernel, (expected, expected_normalizer) = every_way(
            lambda: token_choice.draw(row, u, temperature, hidden))
        assert expected == -1 if not allowed.any() else allowed[expected]
        for token, normalizer in kernel:
            assert token == expected
            assert close(normalizer, expected_normalizer) or normalizer == expected_normalizer == -math.inf
    drawn = token_choice.draw_rows([row] * len(us), us, [hidden] * len(us), temperature)
    assert drawn == [token_choice.draw(row, u, temperature, hidden) for u in us]


@needs_kernel
def test_draws_agree_on_many_full_size_rows():
    """2,000 draws from rows of SmolLM2's size: the kernel's exponentials differ from
    numpy's in the last bits, so a draw could differ only on a boundary (never here)."""
    rng = np.random.default_rng(5)
    ends = np.array([0, 2], dtype=np.int64)
    for _ in range(200):
        row = (rng.standard_normal(49152) * rng.uniform(0.5, 4)).astype(np.float32)
        us = rng.random(10).tolist()
        *kernel, fallback = every_way(lambda: token_choice.draw_rows([row] * 10, us, [ends] * 10))
        for drawn in kernel:
            assert [t for t, _ in drawn] == [t for t, _ in fallback]
            assert all(close(a, b) for (_, a), (_, b) in zip(drawn, fallback))


@needs_kernel
def test_best_agrees_with_the_reference_on_rows_of_many_blocks():
    """Rows past the kernel's 2,048-token blocks: the running maximum growing block after
    block (the sum so far rescaled), ties across blocks, a last partial word, masks summed
    compacted and in place, end ids allowed and hidden."""
    rng = np.random.default_rng(11)
    for size in (151936, 6000 + 17):
        ramp = np.linspace(-40.0, 5.0, size)
        for shape in ("normal", "ramp", "ties"):
            row = (rng.standard_normal(size) * 3).astype(np.float32)
            if shape == "ramp":                       # a new maximum in every block
                row = (ramp + rng.standard_normal(size)).astype(np.float32)
            elif shape == "ties":
                row = rng.integers(-5, 3, size).astype(np.float32)
            for density in (None, 0.27, 0.9):
                mask = None if density is None else TokenMask.of_flags(rng.random(size) < density)
                ends = np.array([size - 3, size - 1], dtype=np.int64)
                for allow, hidden in ((None, ends), (ends, None)):
                    expected = reference(row, mask, allow, hidden)
                    for token, normalizer in every_way(
                            lambda: token_choice.best(row, mask, allow, hidden, normalizer=True)):
                        assert token == expected[0], (size, shape, density)
                        assert close(normalizer, expected[1]), (size, shape, density)


def test_nothing_to_choose_is_minus_one():
    row = np.array([1.0, -np.inf, 3.0], dtype=np.float32)
    empty = TokenMask.of(np.empty(0, dtype=np.int32), 3)
    blocked = TokenMask.of(np.array([1], dtype=np.int32), 3)
    for action in (lambda: token_choice.best(row, empty, None, None, True),
                   lambda: token_choice.best(row, blocked, None, None, True),
                   lambda: token_choice.best(row, None, None, np.array([0, 1, 2]), True),
                   lambda: token_choice.draw(row, 0.5, 1.0, np.array([0, 2]))):
        assert set(every_way(action)) == {(-1, -math.inf)}


# ------------------------------------------------------------------ on the model

QUERIES = [
    (r'"Q: Name a fruit.\nA:[X]" where REGEX(X, r"[a-z ]+") and len(TOKENS(X)) < 8', "argmax"),
    (r'"Q: Pick a colour.\nA:[X]" where X in ["red", "green", "dark blue"]', "argmax"),
    (r'"Once upon a time[X]" where len(TOKENS(X)) < 10', "argmax"),
    (r'"Once upon a time[X]" where len(TOKENS(X)) < 10', "sample(n=3, seed=4)"),
    (r'"My age is [X]" where INT(X) and len(TOKENS(X)) < 4', "sample(n=2, seed=9)"),
    (r'"Q: Name a fruit.\nA:[X]" where REGEX(X, r"[a-z ]+") and len(TOKENS(X)) < 8',
     "sample(n=2, seed=3, temperature=0.7, top_k=40)"),
]
RUN = """
import json, sys, lmq
queries = json.loads(sys.argv[1])
model = lmq.model(None, flash_attn=False)
out = []
for query, decoder in queries:
    results = lmq.run_sync(query, model=model, decoder=decoder)
    results = results if isinstance(results, list) else [results]
    out.append([[r.tokens["X"], r.logprob] for r in results])
print(json.dumps(out))
"""


@pytest.mark.model
@needs_kernel
def test_queries_on_smollm2_give_the_same_results_without_the_kernel():
    def run(no_kernel: bool) -> list:
        env = lmq_env()
        env.pop("LMQ_NO_KERNEL", None)
        if no_kernel:
            env["LMQ_NO_KERNEL"] = "1"
        done = subprocess.run([sys.executable, "-c", RUN, json.dumps(QUERIES)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    kernel, fallback = run(False), run(True)
    for (query, decoder), with_kernel, without in zip(QUERIES, kernel, fallback):
        assert [tokens for tokens, _ in with_kernel] == [tokens for tokens, _ in without], (query, decoder)
        for (_, a), (_, b) in zip(with_kernel, without):
            assert a == pytest.approx(b, abs=1e-4), (query, decoder)
