"""`model.score`: per-token log-probabilities of each value after a prompt, checked
against the model's own rows evaluated one prefix at a time, and the aggregations."""

import numpy as np
import pytest

import lmq

pytestmark = pytest.mark.model

PROMPT = "Q: Name a fruit.\nA:"
VALUES = [" Apple", " Banana split", " Cherry pie with cream"]


def reference_logprobs(backend, prompt, value):
    """Each value token's log-probability from a plain sequence, one prefix at a time."""
    vocabulary = backend.vocabulary
    context = ([vocabulary.bos_id] if vocabulary.add_bos and vocabulary.bos_id is not None else []) \
        + backend.tokenize(prompt)
    tokens = backend.tokenize(value)
    sequence = backend.sequence()
    try:
        out = []
        for i, token in enumerate(tokens):
            row = sequence.logits(context + tokens[:i]).astype(np.float64)
            out.append(row[token] - row.max() - np.log(np.exp(row - row.max()).sum()))
        return np.array(out)
    finally:
        sequence.release()


def test_token_logprobs_match_the_model_rows():
    model = lmq.model(None, flash_attn=False)     # exact to float rounding (see test_decoders_model)
    result = model.score_sync(PROMPT, VALUES)
    assert result.values == VALUES
    for value, tokens, logprobs in zip(VALUES, result.tokens, result.token_logprobs):
        assert tokens == model.backend().tokenize(value)
        assert np.allclose(logprobs, reference_logprobs(model.backend(), PROMPT, value), atol=0.05)


def test_aggregations_probs_and_argmax():
    result = lmq.model().score_sync(PROMPT, VALUES)
    sums = result.logprobs()
    means = result.logprobs("mean")
    assert np.allclose(sums, [t.sum() for t in result.token_logprobs])
    assert np.allclose(means, [t.mean() for t in result.token_logprobs])
    for agg, scores in (("sum", sums), ("mean", means)):
        probs = result.probs(agg)
        assert probs.sum() == pytest.approx(1.0)
        assert np.allclose(np.log(probs) - np.log(probs[0]), scores - scores[0])
        assert result.argmax(agg) == VALUES[int(np.argmax(scores))]
    assert result.argmax() == " Apple"           # the longer values pay for their extra tokens


def test_token_ids_and_text_score_alike():
    model = lmq.model(None, flash_attn=False)     # exact to float rounding (see test_decoders_model)
    backend = model.backend()
    by_text = model.score_sync(PROMPT, VALUES[:2])
    by_ids = model.score_sync(PROMPT, [backend.tokenize(v) for v in VALUES[:2]])
    assert np.allclose(by_text.logprobs(), by_ids.logprobs(), atol=0.05)


def test_async_score_and_bad_arguments():
    import asyncio

    model = lmq.model()
    result = asyncio.run(model.score(PROMPT, [" Apple"]))
    assert result.token_logprobs[0].shape == (len(model.backend().tokenize(" Apple")),)
    with pytest.raises(lmq.QueryArgumentError, match="values"):
        model.score_sync(PROMPT, " Apple")
    with pytest.raises(lmq.QueryArgumentError, match="agg"):
        result.probs("max")
    with pytest.raises(lmq.LmqError, match="await"):
        async def inside():
            model.score_sync(PROMPT, [" Apple"])
        asyncio.run(inside())
