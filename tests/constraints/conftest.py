"""Fixtures of the constraint engine's tests."""

import pytest

from lmq.constraints.vocabulary_cache import clear_caches


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty private disk cache (`$XDG_CACHE_HOME`) and cleared in-memory caches: a
    process that never compiled anything."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    clear_caches()
    yield tmp_path
    clear_caches()
