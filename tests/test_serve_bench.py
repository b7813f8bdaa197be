"""The server bench's smoke run (`python -m bench.server --smoke`), as CI runs it: both
server figures of performance.md are produced, positive and judged against their target."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_produces_both_server_figures(tmp_path):
    out = tmp_path / "figures.json"
    process = subprocess.run([sys.executable, "-m", "bench.server", "--smoke", "--threads", "1",
                              "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    figures = json.loads(out.read_text())
    for key in ("many_clients", "one_client"):
        ratio = figures[key]["ratio"]
        assert math.isfinite(ratio) and ratio > 0
    assert [row["figure"] for row in figures["targets"]] == ["many clients / raw batch",
                                                            "one client / in process"]
    assert all(isinstance(row["pass"], bool) for row in figures["targets"])
    assert "many clients / raw batch" in process.stdout
