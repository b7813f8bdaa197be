"""The `distribution` clause: probabilities over the given values that sum to 1 and match
`model.score`, the most likely value bound and appended, the compile-time rule that the
variable is last, and LMQL's mean normalisation."""

import math

import numpy as np
import pytest

import lmq

REVIEW = '''argmax{args}
    "Review: The food was cold and the waiter was rude.\\n"
    "Sentiment:[CLS]"
where
    len(TOKENS(CLS)) < 5
distribution
    CLS in [" positive", " negative", " mixed feelings"]
'''
VALUES = [" positive", " negative", " mixed feelings"]
PROMPT = "Review: The food was cold and the waiter was rude.\nSentiment:"


@pytest.mark.model
@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_distribution_matches_score_and_binds_the_most_likely(norm):
    args = "" if norm == "sum" else '(distribution_norm="mean")'
    result = lmq.run_sync(REVIEW.format(args=args))
    distribution = result.variables["P(CLS)"]
    assert [v for v, _ in distribution] == VALUES
    probs = np.array([p for _, p in distribution])
    assert probs.sum() == pytest.approx(1.0)
    expected = lmq.model().score_sync(PROMPT, VALUES).probs(norm)
    assert np.allclose(probs, expected, atol=0.01)
    log_probs = [lp for _, lp in result.variables["log P(CLS)"]]
    assert np.allclose(np.exp(log_probs), probs)
    best = VALUES[int(np.argmax(probs))]
    assert result.variables["CLS"] == best and result.prompt == PROMPT + best
    assert result.distribution == distribution


@pytest.mark.model
def test_mean_normalisation_changes_the_ranking_of_long_values():
    sums = dict(lmq.run_sync(REVIEW.format(args="")).variables["P(CLS)"])
    means = dict(lmq.run_sync(REVIEW.format(args='(distribution_norm="mean")')).variables["P(CLS)"])
    assert means[" mixed feelings"] > sums[" mixed feelings"]


def test_probabilities_sum_to_one_on_the_random_backend_for_many_seeds(random_model):
    query = '"Pick:[X]" distribution X in ["a", "bb", "ccc dd", "e"]'.replace('"Pick', 'argmax "Pick')
    for seed in range(30):
        result = lmq.run_sync(query, model=random_model(seed))
        probs = [p for _, p in result.variables["P(X)"]]
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-9)
        best = max(result.variables["P(X)"], key=lambda item: item[1])[0]
        assert result.variables["X"] == best and result.prompt == "Pick:" + best


@pytest.mark.parametrize("query,message", [
    ('argmax "A [X] b" distribution X in ["a"]', "last"),
    ('argmax "A [X][Y]" distribution X in ["a"]', "last"),
    ('argmax "A [X]" distribution X == "a"', "VAR in"),
])
def test_distribution_rules_are_compile_errors(query, message):
    with pytest.raises(lmq.LmqSyntaxError, match=message):
        lmq.query(query)


def test_values_must_be_a_list_of_strings(random_model):
    with pytest.raises(lmq.ConstraintError, match="list of strings"):
        lmq.run_sync('argmax "A [X]" distribution X in [1, 2]', model=random_model())
    with pytest.raises(lmq.QueryArgumentError, match="distribution_norm"):
        lmq.run_sync('argmax "A [X]" distribution X in ["a"]', model=random_model(),
                     distribution_norm="max")
