"""Shared fixtures: the seeded random backend (Gumbel logits over SmolLM2's real
vocabulary, so the argmax is a uniform draw from the allowed tokens)."""

import pytest

import lmq


@pytest.fixture
def random_model():
    """`random_model(seed, end_probability=…)` → `lmq.model("random", seed=seed, …)`."""
    def make(seed: int = 0, **kwargs) -> lmq.Model:
        return lmq.model("random", seed=seed, **kwargs)
    return make
