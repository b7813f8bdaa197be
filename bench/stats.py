"""Summaries of repeated timings (benchmarks report medians and tail percentiles)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 … 100), linear interpolation."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
