"""Compiler fuzz: malformed and mutated queries compile or fail with an `LmqError`, fast.

Seeds are the queries of examples/ and the query strings of the tests; each case applies
one to three mutations (byte deletions, truncation, inserted brackets, quotes, keywords
and constraint calls, deep nesting, random Unicode with lone surrogates, NUL and raw
`\\r`, duplicated spans). A case is compiled (`compile_query`) and defined as a query
(`lmq.query`, which lowers every hole whose operands are literals, as `lmq compile
--gbnf` does); anything but success or an `LmqError`, or more than `SECONDS` for one
case, fails. A CI-sized run of `CI_CASES` cases is the default;
`LMQ_FUZZ_CASES=5000 python -m pytest -s tests/test_compiler_fuzz.py` is the long run
(it prints the count, the errors by class and the slowest case).
"""

from __future__ import annotations

import ast
import collections
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import lmq
from lmq.compiler.codegen import compile_query

ROOT = Path(__file__).resolve().parent.parent
CI_CASES = 300
SECONDS = 5.0

_INSERTS = ["(", ")", "[", "]", "{", "}", "[[", "]]", "{{", "}}", '"', "'", '"""', "'''", "\\",
            "\n", "\n    ", "\t", ":", ",", "=", "@", "#", " where ", " from ", " not ", " in ",
            " and ", " or ", "lambda: ", "if 1:\n", "yield ", "await ", "return ", "def f():\n",
            "class C:\n", "distribution ", "argmax ", "sample(n=2) ", "beam(", "STOPS_AT(",
            "STOPS_BEFORE(X, ", "len(TOKENS(", "len(X) < ", "INT(", "FLOAT(", "REGEX(X, ",
            "GRAMMAR(X, ", "JSON(X, ", "[X]", "[X: int]", "[@f X]", "{:user}", "{x}", "{x!r}",
            "-1", "10**30", "0" * 5000, "r'", "f'", "b'", "u'", "*", "**", "...", "\\ud800",
            "\\x00", "\\N{", "\\u12", "\\r", "\\d"]
_NESTINGS = [("not ", ""), ("(", ")"), ("[", "]"), ("{1:", "}"), ("lambda: ", ""), ("-", ""),
             ("+1", ""), (".a", ""), ("f(", ")"), ("if 1:\n", "")]
_CHARACTERS = ["\x00", "\r", "\x0b", "\x0c", "\x1b", "\x7f", "\u00a0", "\u200b", "\u2028",
               "\ufeff", "\ue000", "\ud800", "\udfff", "\udc80", "é", "日", "😀", "\u0301",
               "\U0010ffff", "\uffff"]


def _test_queries() -> list[str]:
    """String constants of the tests that look like queries (a hole and a quote)."""
    found: list[str] = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and 8 < len(node.value) < 2000 and "[" in node.value \
                    and ('"' in node.value or "'" in node.value):
                found.append(node.value)
    return found


def seed_queries() -> list[str]:
    examples = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.lmq"))]
    return examples + sorted(set(_test_queries()))


def _nest(rng: random.Random, text: str, at: int) -> str:
    opener, closer = rng.choice(_NESTINGS)
    depth = rng.choice([20, 99, 101, 150, 400, 2000, 6000])
    if opener == "if 1:\n":
        block = "".join(" " * i + opener for i in range(depth)) + " " * depth + "pass\n"
        return text[:at] + block + text[at:]
    return text[:at] + opener * depth + "1" + closer * depth + text[at:]


def mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(text))
        kind = rng.randrange(7)
        if kind == 0:
            text = text[:at] + text[at + rng.randint(1, 5):]
        elif kind == 1:
            text = text[:at] + rng.choice(_INSERTS) + text[at:]
        elif kind == 2:
            text = _nest(rng, text, at)
        elif kind == 3:
            text = text[:at] + "".join(rng.choice(_CHARACTERS) for _ in range(rng.randint(1, 3))) + text[at:]
        elif kind == 4:
            text = text[:at]
        elif kind == 5:
            end = min(len(text), at + rng.randint(1, 40))
            text = text[:end] + text[at:end] * rng.randint(1, 3) + text[end:]
        else:
            text = text[:at] + chr(rng.randrange(0x20, 0x3000)) + text[at:]
    return text


def cases(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    seeds = seed_queries()
    return [mutate(rng, rng.choice(seeds)) for _ in range(count)]


def compile_case(text: str) -> str:
    """'ok' or the LmqError class name; any other exception propagates."""
    try:
        compile_query(text, "<fuzz>")
        lmq.query(text)
    except lmq.LmqError as e:
        return type(e).__name__
    return "ok"


def test_mutated_queries_compile_or_fail_with_an_lmq_error():
    count = int(os.environ.get("LMQ_FUZZ_CASES", CI_CASES))
    outcomes: collections.Counter[str] = collections.Counter()
    slowest, slowest_case = 0.0, ""
    for number, text in enumerate(cases(count)):
        start = time.perf_counter()
        try:
            outcomes[compile_case(text)] += 1
        except Exception as error:
            raise AssertionError(f"case {number} raised {type(error).__name__}: {error}\n{text!r}") from error
        elapsed = time.perf_counter() - start
        assert elapsed < SECONDS, f"case {number} took {elapsed:.1f} s:\n{text!r}"
        if elapsed > slowest:
            slowest, slowest_case = elapsed, text
    print(f"\n{count} cases: {dict(outcomes.most_common())}; slowest {slowest:.3f} s: "
          f"{slowest_case[:200]!r}")
    assert sum(outcomes.values()) == count
    assert outcomes["ok"] and outcomes["LmqSyntaxError"]    # the mutations reach both outcomes


def test_lmq_compile_prints_errors_not_tracebacks(tmp_path):
    rng = random.Random(1)
    files = []
    for number, text in enumerate(cases(6, seed=2)):
        path = tmp_path / f"case{number}.lmq"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        files.append(path)
    garbage = tmp_path / "garbage.lmq"
    garbage.write_bytes(bytes(rng.randrange(256) for _ in range(400)))
    files.append(garbage)
    for path in files:
        done = subprocess.run([sys.executable, "-m", "lmq.cli", "compile", "--gbnf", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 1), (path.read_bytes()[:200], done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode == 1:
            assert done.stderr.startswith("lmq: "), done.stderr
