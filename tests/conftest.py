"""Shared fixtures: the seeded random backend (Gumbel logits over SmolLM2's real
vocabulary, so the argmax is a uniform draw from the allowed tokens)."""

import pytest

import lmq
from lmq.constraints.vocabulary_cache import clear_caches


@pytest.fixture
def random_model():
    """`random_model(seed, end_probability=…)` → `lmq.model("random", seed=seed, …)`."""
    def make(seed: int = 0, **kwargs) -> lmq.Model:
        return lmq.model("random", seed=seed, **kwargs)
    return make


class PinnedModel(lmq.Model):
    """A model whose backend is one given instance, so a test can read its counters
    (random backends are otherwise made fresh on every call)."""

    def __init__(self, backend):
        super().__init__(None)
        self._backend = backend

    def backend(self):
        return self._backend


@pytest.fixture
def pinned_model():
    """`pinned_model(backend)` → a model that always runs on that backend instance."""
    return PinnedModel


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty private disk cache (`$XDG_CACHE_HOME`) and cleared in-memory constraint
    caches: a process that never compiled anything."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    clear_caches()
    yield tmp_path
    clear_caches()
