"""Sampling knobs on fixed logits rows: each knob's distribution is derived here from its
definition and checked against the sampler's draws (binomial 5-sigma bounds per token)."""

import math

import numpy as np
import pytest

import lmq
from lmq.backends.sampling_settings import SamplingSettings
from lmq.runtime.sampling import DrawAhead, Sampler, make_sampler

ROW = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.0, -0.4, -1.0, -2.0, 3.0, -np.inf], dtype=np.float32)
DRAWS = 20000


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    out = np.zeros_like(x)
    e = np.exp(x[finite] - x[finite].max())
    out[finite] = e / e.sum()
    return out


def sampler(seed=0, **knobs):
    return Sampler(SamplingSettings.of(knobs), np.random.default_rng(seed))


def assert_draws_follow(s, expected, history=(), row=ROW):
    counts = np.bincount([s.pick(row, history) for _ in range(DRAWS)], minlength=row.size)
    assert np.all(counts[expected == 0] == 0), (counts, expected)
    sigma = np.sqrt(DRAWS * expected * (1 - expected))
    assert np.all(np.abs(counts - DRAWS * expected) <= 5 * sigma + 1), (counts / DRAWS, expected)
    assert np.allclose(s.distribution(row, history), expected, atol=1e-9)


def restricted(keep):
    logits = np.where(keep, ROW, -np.inf)
    return softmax(logits)


def test_no_knob_samples_the_softmax():
    assert_draws_follow(sampler(), softmax(ROW))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_logits(temperature):
    expected = softmax(ROW / temperature)
    assert_draws_follow(sampler(temperature=temperature), expected)
    entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))
    base = entropy(softmax(ROW))
    assert (entropy(expected) < base) == (temperature < 1)


def test_temperature_zero_is_greedy():
    s = sampler(temperature=0)
    assert {s.pick(ROW) for _ in range(50)} == {10}


def test_top_k_keeps_the_k_most_likely():
    order = np.argsort(-ROW)
    keep = np.zeros(ROW.size, bool)
    keep[order[:3]] = True
    assert_draws_follow(sampler(top_k=3), restricted(keep))


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = softmax(ROW)
    order = np.argsort(-p)
    cumulative = np.cumsum(p[order])
    size = int(np.argmax(cumulative >= 0.6)) + 1
    keep = np.zeros(ROW.size, bool)
    keep[order[:size]] = True
    assert 1 < size < 8
    assert_draws_follow(sampler(top_p=0.6), restricted(keep))


def test_top_p_on_a_large_row_uses_the_same_rule():
    rng = np.random.default_rng(1)
    row = rng.normal(size=50000).astype(np.float32)
    p = softmax(row)
    order = np.argsort(-p)
    size = int(np.argmax(np.cumsum(p[order]) >= 0.3)) + 1
    got = sampler(top_p=0.3).distribution(row)
    assert np.count_nonzero(got) == size > 1000
    assert set(np.flatnonzero(got)) == set(order[:size])


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    p = softmax(ROW)
    assert_draws_follow(sampler(min_p=0.2), restricted(p >= 0.2 * p.max()))


def test_typical_p_keeps_tokens_closest_to_the_entropy():
    p = softmax(ROW)
    finite = p > 0
    entropy = -np.sum(p[finite] * np.log(p[finite]))
    distance = np.where(finite, np.abs(-np.log(np.where(finite, p, 1)) - entropy), np.inf)
    order = np.argsort(distance, kind="stable")
    size = int(np.argmax(np.cumsum(p[order]) >= 0.3)) + 1
    keep = np.zeros(ROW.size, bool)
    keep[order[:size]] = True
    assert not keep[10] and size == 3, "the most likely token is atypical here"
    assert_draws_follow(sampler(typical_p=0.3), restricted(keep))


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    history = [0, 8, 0]
    logits = ROW.astype(np.float64).copy()
    logits[0] = ROW[0] / 1.8
    logits[8] = ROW[8] * 1.8
    expected = softmax(logits)
    assert expected[0] < softmax(ROW)[0] and expected[8] < softmax(ROW)[8]
    assert_draws_follow(sampler(repetition_penalty=1.8), expected, history)


def test_frequency_and_presence_penalties_subtract_per_count_and_once():
    history = [1, 1, 1, 4]
    logits = ROW.astype(np.float64).copy()
    logits[1] -= 3 * 0.5 + 0.7
    logits[4] -= 1 * 0.5 + 0.7
    assert_draws_follow(sampler(frequency_penalty=0.5, presence_penalty=0.7), softmax(logits), history)


def test_penalties_look_only_at_the_last_n_tokens():
    s = sampler(repeat_penalty=3.0, penalty_last_n=2)
    assert np.allclose(s.distribution(ROW, [10, 5, 6]), s.distribution(ROW, [5, 6]))
    assert not np.allclose(s.distribution(ROW, [10, 5]), s.distribution(ROW, [5]))


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_steers_the_mean_surprise_to_tau(version):
    ranks = np.arange(1, 2001)
    row = (-1.1 * np.log(ranks)).astype(np.float32)      # a Zipf row, as mirostat assumes
    p = softmax(row)
    model_surprise = {}
    for tau in (2.0, 5.0):
        s = sampler(seed=3, mirostat=version, mirostat_tau=tau, mirostat_eta=0.1)
        observed, raw = [], []
        for _ in range(3000):
            q = s.distribution(row)           # what this draw samples from (mu before the draw)
            token = s.pick(row)
            observed.append(-math.log2(q[token]))
            raw.append(-math.log2(p[token]))
        assert abs(np.mean(observed[500:]) - tau) < 0.35
        model_surprise[tau] = np.mean(raw[500:])
    assert model_surprise[2.0] + 1 < model_surprise[5.0]


def test_mirostat_2_drops_tokens_more_surprising_than_mu():
    s = sampler(mirostat=2, mirostat_tau=1.0)
    p = softmax(ROW)
    got = s.distribution(ROW)
    assert np.array_equal(got > 0, -np.log2(np.where(p > 0, p, 1e-300)) <= s.mu)


@pytest.mark.parametrize("knobs", [{}, {"temperature": 3.0}, {"top_k": 5}, {"top_p": 0.99},
                                   {"min_p": 0.01}, {"typical_p": 0.9}, {"repeat_penalty": 0.1},
                                   {"frequency_penalty": -50.0, "presence_penalty": -50.0},
                                   {"mirostat": 1}, {"mirostat": 2, "mirostat_tau": 10.0}])
def test_no_knob_makes_a_masked_token_possible(knobs):
    masked = ROW.copy()
    masked[[10, 0, 3]] = -np.inf
    s = sampler(**knobs)
    history = [10, 10, 0, 3, 3]
    assert s.distribution(masked, history)[[10, 0, 3, 11]].sum() == 0
    assert not {s.pick(masked, history) for _ in range(3000)} & {10, 0, 3, 11}


def test_same_seed_same_draws_and_branches_differ():
    def draws(seed, branch):
        s = make_sampler({"temperature": 1.5}, seed, branch)
        return [s.pick(ROW) for _ in range(200)]

    assert draws(7, 0) == draws(7, 0)
    assert draws(7, 0) != draws(7, 1)
    assert draws(7, 0) != draws(8, 0)


@pytest.mark.parametrize("knobs,culprit", [({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"),
                                           ({"mirostat": 3}, "mirostat"), ({"top_k": 1.5}, "top_k"),
                                           ({"min_p": "a"}, "min_p")])
def test_bad_knob_values_are_errors_naming_them(knobs, culprit):
    with pytest.raises(lmq.QueryArgumentError, match=culprit):
        SamplingSettings.of(knobs)


def test_penalties_on_a_gathered_row_follow_the_token_ids():
    ids = np.array([3, 7, 20, 41], dtype=np.int64)        # a sparse mask's allowed tokens
    gathered = np.array([1.0, 2.0, 0.5, -1.0], dtype=np.float32)
    full = np.full(50, -np.inf, dtype=np.float32)
    full[ids] = gathered
    s = sampler(repeat_penalty=2.0, frequency_penalty=0.3)
    history = [7, 7, 41, 9]
    expected = s.distribution(full, history)[ids]
    counts = np.bincount([s.pick(gathered, history, ids) for _ in range(DRAWS)], minlength=4)
    sigma = np.sqrt(DRAWS * expected * (1 - expected))
    assert np.all(np.abs(counts - DRAWS * expected) <= 5 * sigma + 1)
    assert expected[1] < softmax(gathered)[1]


def test_hidden_entries_are_never_drawn_and_leave_the_normalizer():
    """The copy-free draw of a plain sampler (end tokens hidden while a value may not end)
    samples the softmax of the other entries, and its normalizer is theirs."""
    hidden = np.array([10, 0])
    s = sampler(seed=3)
    counts = np.bincount([s.pick_hiding(ROW, hidden) for _ in range(DRAWS)], minlength=ROW.size)
    expected = restricted(~np.isin(np.arange(ROW.size), hidden))
    assert counts[hidden].sum() == 0
    sigma = np.sqrt(DRAWS * expected * (1 - expected))
    assert np.all(np.abs(counts - DRAWS * expected) <= 5 * sigma + 1), (counts / DRAWS, expected)
    finite = np.isfinite(ROW) & ~np.isin(np.arange(ROW.size), hidden)
    assert math.isclose(s.log_normalizer, math.log(np.exp(ROW[finite].astype(np.float64)).sum()),
                        rel_tol=1e-6)
    only = np.full(4, -np.inf, dtype=np.float32)
    only[1] = 0.0
    assert s.pick_hiding(only, np.array([1])) == -1


def test_a_steps_draws_ahead_in_one_call_are_each_samplers_own_draws():
    """`DrawAhead.run_all` (one kernel call for a step's rows) draws what each branch's
    sampler draws alone (`pick_hiding`), each stream and normalizer moving as they would."""
    rows = np.random.default_rng(2).normal(0, 3, (6, 300)).astype(np.float32)
    rows[4] = -np.inf                                 # nothing left to draw: -1
    hiddens = [None, np.array([3, 7]), None, np.array([0]), None, np.array([299])]

    def aheads():
        made = [DrawAhead(make_sampler({}, seed=5, branch=i)) for i in range(len(rows))]
        for ahead, hidden in zip(made, hiddens):
            ahead.hidden = hidden
        return made

    alone, together = aheads(), aheads()
    for _ in range(3):
        for ahead, row in zip(alone, rows):
            ahead.token = ahead.sampler.pick_hiding(row, ahead.hidden)
        DrawAhead.run_all(together, list(rows))
        assert [a.token for a in together] == [a.token for a in alone]
        assert [a.sampler.log_normalizer for a in together] == [a.sampler.log_normalizer for a in alone]
        assert together[4].token == -1 and together[1].token not in (3, 7)
    assert [a.sampler.state() for a in together] == [a.sampler.state() for a in alone]


@pytest.mark.parametrize("knobs", [{"temperature": 0.9, "top_k": 20}, {"mirostat": 2}])
def test_a_restored_state_continues_the_draws(knobs):
    """`state()`/`restore()` (what an LMTP hole carries): a sampler restored from another's
    state draws what that one draws next, mirostat's mu included; malformed states are
    ValueErrors."""
    rows = np.random.default_rng(1).normal(0, 3, (40, 200)).astype(np.float32)
    original = make_sampler(knobs, seed=4)
    for row in rows[:20]:
        original.pick(row)
    copy = make_sampler(knobs, seed=99)
    copy.restore(original.state())
    assert [copy.pick(row) for row in rows[20:]] == [original.pick(row) for row in rows[20:]]
    assert copy.state() == original.state()
    for bad in ({"rng": 5, "mu": 1.0}, {"mu": 1.0}, {**original.state(), "mu": math.inf}, None):
        with pytest.raises(ValueError, match="not a sampler state"):
            copy.restore(bad)
