"""The constraint bench's smoke run (`python -m bench.constraints --smoke`), as CI runs it:
every figure is produced, finite and positive, every target row is judged, and each value
generated for a throughput figure satisfies its constraint (checked here with Python's
own `re`, `json` and list membership, independently of lmq and of the bench)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
CASES = ("regex", "in", "int", "stops_at", "json", "none")
MASKED = ("regex", "in", "int", "json")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(figures from --json, printed report) of one smoke run on one thread."""
    out = tmp_path_factory.mktemp("bench") / "figures.json"
    process = subprocess.run(
        [sys.executable, "-m", "bench.constraints", "--smoke", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(out.read_text()), process.stdout


def numbers(tree, path=()):
    """(path, number) of every number under `tree`, lists included."""
    if isinstance(tree, dict):
        for key, item in tree.items():
            yield from numbers(item, path + (key,))
    elif isinstance(tree, list):
        for index, item in enumerate(tree):
            yield from numbers(item, path + (index,))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_every_figure_is_produced_finite_and_positive(smoke):
    figures, _ = smoke
    assert set(figures["throughput"]) == set(CASES)
    for name in CASES:
        row = figures["throughput"][name]
        for key in ("ratio", "call_ratio", "time_ratio", "reference_ratio", "raw_tokens_per_s",
                    "tokens", "lmq_evaluated_tokens"):
            assert key in row, (name, key)
        for key in ("token_counts", "lmq_hole_s", "lmq_call_s", "raw_s", "reference_s",
                    "reference_tokens", "reference_raw_s"):
            assert len(row[key]) == figures["settings"]["reps"], (name, key)
    assert set(MASKED) | {"all"} <= set(figures["mask_step"])
    assert figures["mask_step"]["size"] == 151936
    assert set(CASES) - {"none"} | {"lmql"} == set(figures["compile"])
    assert all(set(row) == {"cold_p50_ms", "disk_p50_ms", "warm_p50_ms"}
               for row in figures["compile"].values())
    assert {"cold_s", "cached_s", "llguidance_tokenizer_s", "token_bytes_s"} <= set(figures["vocabulary"])
    checked = 0
    for section in ("throughput", "mask_step", "compile", "vocabulary", "sections_s"):
        for path, value in numbers(figures[section]):
            if path[-1] == "value" or (len(path) > 1 and path[1] == "value"):
                continue                       # a generated value (INT may be ≤ 0)
            assert math.isfinite(value) and value > 0, (section, path, value)
            checked += 1
    assert checked > 80
    assert math.isfinite(figures["wall_s"]) and figures["wall_s"] > 0


def test_every_target_is_judged_and_printed(smoke):
    figures, report = smoke
    rows = figures["targets"]
    assert len(rows) == 12
    for row in rows:
        assert isinstance(row["pass"], bool) and math.isfinite(row["value"]) and row["value"] > 0
        printed = re.search(rf"^{re.escape(row['figure'])}\s+([0-9.]+)\s+(\S+ \S+)\s+(PASS|MISS)$",
                            report, re.MULTILINE)
        assert printed, row["figure"]
        assert printed.group(2) == row["target"]
        assert printed.group(3) == ("PASS" if row["pass"] else "MISS")
        assert float(printed.group(1)) == pytest.approx(row["value"], abs=1e-3)


def _json_problem(value, schema):
    if "enum" in schema:
        return value not in schema["enum"]
    if schema["type"] == "object":
        return (not isinstance(value, dict) or not set(schema["required"]) <= set(value)
                or not set(value) <= set(schema["properties"])
                or any(_json_problem(v, schema["properties"][k]) for k, v in value.items()))
    if schema["type"] == "string":
        return not isinstance(value, str) or len(value) > schema.get("maxLength", math.inf)
    if schema["type"] == "integer":
        return not isinstance(value, int) or isinstance(value, bool)
    if schema["type"] == "array":
        return (not isinstance(value, list) or len(value) > schema.get("maxItems", math.inf)
                or any(_json_problem(v, schema["items"]) for v in value))
    raise AssertionError(f"schema type {schema['type']} is not used by the smoke bench")


def test_generated_values_satisfy_their_constraints(smoke):
    figures, _ = smoke
    n = figures["settings"]["tokens"]
    rows = figures["throughput"]
    for name in CASES:
        assert rows[name]["problem"] is None, rows[name]["problem"]
        assert rows[name]["tokens"] >= 1
    assert re.fullmatch(r"[a-z ]+", rows["regex"]["value"]) and rows["regex"]["tokens"] == n
    assert rows["in"]["value"] in figures["settings"]["options"]
    assert isinstance(rows["int"]["value"], int) and rows["int"]["tokens"] <= n
    stopped = rows["stops_at"]["value"]
    assert rows["stops_at"]["tokens"] <= n
    assert "THE END" not in stopped or stopped.index("THE END") == len(stopped) - len("THE END")
    document = rows["json"]["value"]
    assert not _json_problem(document, figures["settings"]["schema"]), document
    assert json.loads(json.dumps(document)) == document
    assert rows["none"]["tokens"] == n


def test_lmq_evaluates_no_more_tokens_than_it_generates(smoke):
    """Prompt evaluation is excluded equally: a timed lmq call evaluates the prompt's last
    token and the generated ones (fewer when forced text goes in one batch), as the raw
    loop does; one more at most, when the hole ends on an end token."""
    figures, _ = smoke
    for name, row in figures["throughput"].items():
        assert row["lmq_evaluated_tokens"] <= row["tokens"] + 1, name
