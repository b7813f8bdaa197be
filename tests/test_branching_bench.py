"""The branching bench's smoke run (`python -m bench.branching --smoke`): its three
figures of performance.md are produced, finite and positive."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_produces_the_branching_figures(tmp_path):
    out = tmp_path / "figures.json"
    process = subprocess.run([sys.executable, "-m", "bench.branching", "--smoke", "--threads", "1",
                              "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    figures = json.loads(out.read_text())
    for key in ("sample8_over_raw8", "sample8_over_8_sequential_sample1",
                "concurrent_over_sequential_async"):
        assert math.isfinite(figures[key]) and figures[key] > 0
    assert "sample(n=8) / raw 8-sequence batch" in process.stdout
