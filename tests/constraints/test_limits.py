"""Constraints that used to blow up (minutes, gigabytes, MemoryError, RecursionError) answer
at once: a `ConstraintTooLarge` naming the limit, or a value when the constraint is cheap
after all (`len(X) < 10**9` is a budget, not states). Each case runs in a fresh process
that reports its time and how far its peak memory grew; the regex reproducer of the
unsound star runs end to end."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys


import lmq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECONDS = 5                    # generous: each case takes well under a second here
MEGABYTES = 500


def _chain(rules: int, way_out: str = "") -> str:
    """root → r0 → r1 → … each reading "a" (or `way_out` instead, which ends the value)."""
    out = f' | "{way_out}"' if way_out else ""
    return "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}{out}\n' for i in range(rules)) \
        + f'r{rules} ::= "a"\n'


def _random_regex(seed: int) -> str:
    """A long random regex over a small alphabet, like the one that built ~10**6 states."""
    rng = random.Random(seed)
    pieces = ["(a|b)*", ".*", "[ab]", "[^a]", "[a-c]", "a", "b", "[ab]{2,6}", "c?", "(ab|b)+"]
    out = ""
    while len(out) < 56:
        out += rng.choice(pieces)
    return out


def _words(count: int) -> list[str]:
    rng = random.Random(count)
    return ["".join(rng.choice("abcdefghij ") for _ in range(rng.randint(4, 12)))
            for _ in range(count)]


CASES = {  # query → extra arguments; "ok" cases must succeed, the others be too large
    "len(X) < 100000": ('"[X]" where len(X) < 100000 and len(TOKENS(X)) < 20', {}, "ok"),
    "len(X) < 10**9": ('"[X]" where len(X) < 10**9 and len(TOKENS(X)) < 20', {}, "ok"),
    "len(X) > 10**5": ('"[X]" where len(X) > 100000', {}, "large"),
    "len(X) == 10**9": ('"[X]" where len(X) == 10**9', {}, "large"),
    "len inside or": ('"[X]" where len(X) < 10**9 or X == "a"', {}, "large"),
    "X in 2,000 words": ('"[X]" where X in words', {"words": _words(2_000)}, "ok"),
    "X in 100,000 words": ('"[X]" where X in words', {"words": _words(100_000)}, "large"),
    "(a|b)*a(a|b){20}": ('"[X]" where REGEX(X, r"(a|b)*a(a|b){20}")', {}, "large"),
    ".*a.{40}": ('"[X]" where REGEX(X, r".*a.{40}")', {}, "large"),
    "a{10**6}": ('"[X]" where REGEX(X, r"(a{1000}){1000}")', {}, "large"),
    "900-rule GBNF chain": ('"[X]" where GRAMMAR(X, g) and len(TOKENS(X)) < 4',
                            {"g": _chain(900, way_out="b")}, "ok"),
    "GBNF nested 90 deep": ('"[X]" where GRAMMAR(X, g)',
                            {"g": "root ::= " + "(" * 90 + '"a"' + ")" * 90}, "ok"),
    "10,000-rule GBNF chain": ('"[X]" where GRAMMAR(X, g)', {"g": _chain(10_000)}, "large"),
    "GBNF nested 10,000 deep": ('"[X]" where GRAMMAR(X, g)',
                                {"g": "root ::= " + "(" * 10_000 + '"a"' + ")" * 10_000}, "large"),
    "GBNF a{2000}{2000}": ('"[X]" where GRAMMAR(X, g) and len(TOKENS(X)) < 4',
                           {"g": 'root ::= ("a"{2000}){2000}\n'}, "large"),
    "GBNF of 5,000 alternatives": ('"[X]" where GRAMMAR(X, g)', {"g": "root ::= " + " | ".join(
        f'"w{i}x{i * 7}"' for i in range(5_000)) + "\n"}, "large"),     # llguidance's limit
}
RANDOM_REGEXES = [_random_regex(seed) for seed in range(10)] + [
    "(a|b)*a[ab][ab][ab][ab][ab][ab][ab][ab][ab][ab][ab][ab][ab][ab][ab][ab][ab]"]

SCRIPT = """
import json, resource, sys, time
import lmq
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
lmq.run_sync('"[X]" where len(TOKENS(X)) < 3', model=lmq.model("random"))   # warm up
for query, arguments in json.loads(sys.stdin.read()):
    before, started = peak(), time.monotonic()
    try:
        lmq.run_sync(query, model=lmq.model("random", seed=1), **arguments)
        outcome = "ok"
    except lmq.ConstraintTooLarge as error:
        outcome = "large: " + str(error)
    except lmq.LmqError as error:
        outcome = f"{type(error).__name__}: {error}"
    print(json.dumps([outcome, time.monotonic() - started, peak() - before]), flush=True)
"""


def _measure(cases: list[tuple[str, dict]], **environment: str) -> list[tuple[str, float, float]]:
    """(outcome, seconds, MB the peak memory grew) of each query, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], input=json.dumps(cases), cwd=ROOT,
                          env={**os.environ, **environment}, capture_output=True, text=True,
                          timeout=60 + SECONDS * len(cases))
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(json.loads(line)) for line in done.stdout.splitlines()]


def test_blow_ups_answer_at_once_within_bounded_memory():
    names = list(CASES)
    results = _measure([CASES[name][:2] for name in names])
    for name, (outcome, seconds, grown) in zip(names, results):
        expected = CASES[name][2]
        assert outcome.startswith(expected), (name, outcome)
        if expected == "large":
            assert "constraint too large" in outcome and "limit" in outcome, (name, outcome)
        assert seconds < SECONDS and grown < MEGABYTES, (name, seconds, grown)


def test_long_random_regexes_compile_or_are_refused_at_once():
    results = _measure([(f'"[X]" where REGEX(X, r"{p}") and len(TOKENS(X)) < 8', {})
                        for p in RANDOM_REGEXES])
    for pattern, (outcome, seconds, grown) in zip(RANDOM_REGEXES, results):
        assert outcome == "ok" or outcome.startswith("large") \
            or outcome.startswith("UnsatisfiableConstraint"), (pattern, outcome)
        assert seconds < SECONDS and grown < MEGABYTES, (pattern, seconds, grown)
    assert any(outcome.startswith("large") for outcome, _, _ in results)


def test_star_over_a_looping_body_end_to_end():
    """The reported reproducer: 12 of 40 seeds raised ConstraintViolation."""
    values = set()
    for seed in range(40):
        result = lmq.run_sync('"[X: r\'(ab+)*\']" where len(TOKENS(X)) < 4',
                              model=lmq.model("random", seed=seed))
        assert re.fullmatch(r"(ab+)*", result.variables["X"]), seed
        values.add(result.variables["X"])
    assert len(values) > 5


def test_limits_are_set_by_environment_variables():
    query = ('"[X]" where REGEX(X, r"[ab]{1,300}") and len(TOKENS(X)) < 3', {})
    [(outcome, _, _)] = _measure([query])
    assert outcome == "ok"
    [(outcome, _, _)] = _measure([query], LMQ_MAX_STATES="100")
    assert outcome.startswith("large") and "the limit is 100 " in outcome, outcome
