"""The server and branching benches' smoke runs (`python -m bench.server --smoke`,
`python -m bench.branching --smoke`), as CI runs them: their figures of performance.md
are produced, finite and positive."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]


def smoke_run(module: str, tmp_path: Path) -> tuple[dict, str]:
    """(figures written with --json, printed report) of one bench's smoke run."""
    out = tmp_path / "figures.json"
    process = subprocess.run([sys.executable, "-m", module, "--smoke", "--threads", "1",
                              "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(out.read_text()), process.stdout


def test_server_smoke_run_produces_both_server_figures(tmp_path):
    figures, report = smoke_run("bench.server", tmp_path)
    for key in ("many_clients", "one_client"):
        ratio = figures[key]["ratio"]
        assert math.isfinite(ratio) and ratio > 0
    assert [row["figure"] for row in figures["targets"]] == ["many clients / raw batch",
                                                            "one client / in process"]
    assert all(isinstance(row["pass"], bool) for row in figures["targets"])
    assert "many clients / raw batch" in report


def test_branching_smoke_run_produces_the_branching_figures(tmp_path):
    figures, report = smoke_run("bench.branching", tmp_path)
    for key in ("sample8_over_raw8", "sample8_over_8_sequential_sample1",
                "concurrent_over_sequential_async"):
        assert math.isfinite(figures[key]) and figures[key] > 0
    assert "sample(n=8) / raw 8-sequence batch" in report


def test_trace_smoke_run_produces_the_tracing_figures(tmp_path):
    out = tmp_path / "figures.json"
    process = subprocess.run([sys.executable, "-m", "bench.trace", "--smoke", "--threads", "1",
                              "--before", "HEAD", "--json", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    figures = json.loads(out.read_text())
    cases = ("argmax_regex", "argmax_unconstrained", "sample4_regex")
    for case in cases:
        ratio = figures["tracing"][case]["on_over_off"]
        assert math.isfinite(ratio) and ratio > 0
        assert figures["tracing"][case]["trace_events"] > 4         # query, text, hole, tokens, …
        assert math.isfinite(figures["before"]["now_over_before"][case])
    assert set(figures["tracer_token_us"]) == {"unmasked", "sparse_1pct", "dense_90pct"}
    assert all(us > 0 for us in figures["tracer_token_us"].values())
    assert "on/off" in process.stdout and "untraced now/before (HEAD)" in process.stdout
