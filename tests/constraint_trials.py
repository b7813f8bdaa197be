"""Random constraint trials on the random backend over the five shared vocabularies: every
value checked in plain Python (soundness), every dead end searched for a value the engine
missed (completeness), every other outcome counted.

A trial is one `"Start:[X]" where <clause>` with a random clause over regexes (generated
ones included), `in`/`not in`, `==`/`!=`, substrings, `len(X)` (small bounds in the
automaton, large ones as a character budget), `INT`, `FLOAT`, `and`/`or`/`not`, stop
phrases and token counts. Outcomes:

- `ok`: a value that `python_verdict` accepts;
- `violation`: a value it rejects, or `ConstraintViolation` (the engine's own net caught
  a bad value): a soundness bug;
- `unsatisfiable`: refused before decoding (an empty language or impossible bounds);
- `dead end`: `UnsatisfiableConstraint` while decoding; `proven satisfiable` when a
  breadth-first search over the hole's token automaton (every token of the vocabulary
  from every reachable state, within the token budget) finds a value after all, split by
  kind: `budget` (a token count was set), `multi-byte` (the value so far ends inside a
  UTF-8 character), `other`;
- `refused`: another `LmqError` (`ConstraintTooLarge`, …); `crash`: any other exception.

`python tests/constraint_trials.py --trials 10000` prints the counts (the long run);
`tests/constraints/test_constraint_properties.py` runs a CI-sized sample and, with
`LMQ_LONG_PROPERTIES=1`, the long run.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import lmq
from lmq.compiler.codegen import compile_query
from lmq.constraints.char_budget import CharBudgetAutomaton, walk_vocabulary
from lmq.constraints.languages import TYPE_PATTERNS
from lmq.constraints.token_masks import DfaTokenAutomaton
from lmq.constraints.vocabulary_index import vocabulary_index
from lmq.runtime.hole import plan_hole

from vocab_paths import VOCAB_DIR

VOCABULARIES = sorted(VOCAB_DIR.glob("*.gguf"))

OPTIONS = ["a", " a", "ab", " yes", " no", "é", " café", "日本", "12", "-3", "x y", "", "abab",
           " 3.5", "日本語です"]
SUBSTRINGS = ["a", "e", " ", "ab", "é", "1", "\n"]
PATTERNS = [r"[a-z]+", r"[0-9]{1,3}", r"(ab|c)*d?", r"[^a-z]{2,4}", r".{0,3}", r"é+|x",
            r"\d+", r"\w{1,3}", r" ?[A-Z][a-z]*", r"(yes|no)\.?", r"(ab+)*", r"(ab*)*c",
            r"(a[bc]+)*", r"(,[0-9]+)*", r"(\.[0-9]+)*", r"(-\d+)*", r"( [a-z]+){1,3}",
            r"[^\n]{5,}", r"(\d\d:)+\d\d", r"日本?語*"]
ATOMS = ["a", "b", " ", "é", "[ab]", "[^a]", ".", r"\d", r"\w", "[a-c ]"]
QUANTIFIERS = ["*", "+", "?", "{2}", "{0,2}", "{1,3}", "{2,}"]
COMPARISONS = ["<", "<=", "==", "!=", ">", ">="]
#: how many automaton states a completeness search may hold per step before giving up
SEARCH_FRONTIER = 4000


def generated_pattern(rng: random.Random, depth: int = 0) -> str:
    """A small random regex: atoms, sequences, alternations and quantified groups."""
    roll = rng.random()
    if depth >= 3 or roll < 0.35:
        return rng.choice(ATOMS)
    if roll < 0.6:
        return "".join(generated_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3)))
    if roll < 0.8:
        return "(" + "|".join(generated_pattern(rng, depth + 1) for _ in range(2)) + ")"
    return f"({generated_pattern(rng, depth + 1)}){rng.choice(QUANTIFIERS)}"


#: the kinds of atomic constraint on X, each a clause from a random generator
ATOM_KINDS = [
    lambda rng: f"X in {rng.sample(OPTIONS, rng.randint(1, 4))!r}",
    lambda rng: f"X not in {rng.sample(OPTIONS, rng.randint(1, 3))!r}",
    lambda rng: f"X {rng.choice(['==', '!='])} {rng.choice(OPTIONS)!r}",
    lambda rng: f"{rng.choice(SUBSTRINGS)!r} {rng.choice(['in', 'not in'])} X",
    lambda rng: f"len(X) {rng.choice(COMPARISONS)} {rng.randint(0, 8)}",
    lambda rng: f"{rng.choice(['INT', 'FLOAT'])}(X)",
    lambda rng: f"REGEX(X, {generated_pattern(rng)!r})",
    lambda rng: f"REGEX(X, {rng.choice(PATTERNS)!r})",
]
ATOM_WEIGHTS = [1, 1, 1, 1, 1, 1, 1, 4]


def _atom(rng: random.Random) -> str:
    return rng.choices(ATOM_KINDS, ATOM_WEIGHTS)[0](rng)


def _formula(rng: random.Random, depth: int = 0) -> str:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        return f"({_formula(rng, depth + 1)} {rng.choice(['and', 'or'])} {_formula(rng, depth + 1)})"
    if depth < 2 and roll < 0.33:
        return f"not ({_formula(rng, depth + 1)})"
    return _atom(rng)


def random_clause(rng: random.Random) -> str:
    """A where clause for X: a formula, a token budget, sometimes a character budget (the
    decoder's), a lower token bound or a stop phrase (never both: LMQL holds stops back
    below a minimum, which the plain reading below does not model)."""
    clause = f"{_formula(rng)} and len(TOKENS(X)) {rng.choice(['<', '<='])} {rng.randint(2, 14)}"
    roll = rng.random()
    if roll < 0.25:
        clause += f" and len(X) {rng.choice(['<', '<='])} {rng.choice([3, 9, 20, 300, 10 ** 9])}"
    roll = rng.random()
    if roll < 0.2:
        clause += f" and {rng.choice(['STOPS_AT', 'STOPS_BEFORE'])}(X, {rng.choice(SUBSTRINGS)!r})"
    elif roll < 0.35:
        clause += f" and len(TOKENS(X)) {rng.choice(['>', '>=', '=='])} {rng.randint(1, 3)}"
    return clause


def python_verdict(clause: str, value: str, tokens: list[int]) -> bool:
    """The clause as Python reads it, on the final value: the reference lmq must agree with."""
    def stops(_value, phrase, keep):
        position = value.find(phrase)
        return position < 0 or (keep and position + len(phrase) == len(value))

    names = {"X": value, "TOKENS": lambda _: tokens,
             "INT": lambda v: re.fullmatch(TYPE_PATTERNS["INT"], v) is not None,
             "FLOAT": lambda v: re.fullmatch(TYPE_PATTERNS["FLOAT"], v) is not None,
             "REGEX": lambda v, p: re.fullmatch(p, v) is not None,
             "STOPS_AT": lambda v, p: stops(v, p, True),
             "STOPS_BEFORE": lambda v, p: stops(v, p, False)}
    return bool(eval(clause, {"__builtins__": {"len": len}}, names))


def satisfiable(clause: str, vocabulary) -> bool | None:
    """Whether some token sequence within the clause's token budget reaches a complete
    value, by breadth-first search over the hole's token automaton with every token of
    the vocabulary (None: the search grew too large to decide)."""
    plan = plan_hole("X", compile_query(f'"[X]" where {clause}').holes[0].where,
                     {"__builtins__": {}}, vocabulary)
    automaton = plan.automaton
    base = automaton.base if isinstance(automaton, CharBudgetAutomaton) else automaton
    if not isinstance(base, DfaTokenAutomaton):
        return None
    index = vocabulary_index(vocabulary)
    dfa = base.dfa
    frontier = {automaton.initial()}
    for count in range(0, (plan.max_tokens if plan.max_tokens is not None else 16) + 1):
        for state in frontier:
            dfa_state = state[0] if isinstance(state, tuple) else state
            if plan.may_end_at(count) and (automaton.accepts(state) or dfa.exits[dfa_state]):
                return True
        following = set()
        for state in frontier:
            dfa_state, used = state if isinstance(state, tuple) else (state, 0)
            if dfa.exits[dfa_state]:
                continue
            ends, chars = walk_vocabulary(index, dfa.transitions, dfa.exits, dfa_state)
            live = ends != 0
            if isinstance(automaton, CharBudgetAutomaton):
                live &= used + chars <= automaton.limit
                following.update(zip(ends[live].tolist(), (used + chars[live]).tolist()))
            else:
                following.update(np.unique(ends[live]).tolist())
        if len(following) > SEARCH_FRONTIER:
            return None
        frontier = following
    return False


def run_trial(rng: random.Random, vocab: Path, seed: int) -> tuple[str, str]:
    """(outcome, detail) of one random trial."""
    clause = random_clause(rng)
    model = lmq.model("random", vocab=str(vocab), seed=seed, end_probability=rng.choice([0.05, 0.3]))
    try:
        result = lmq.run_sync(f'"Start:[X]" where {clause}', model=model)
    except lmq.ConstraintViolation as error:
        return "violation", f"{clause}: {error}"
    except lmq.UnsatisfiableConstraint as error:
        if "no token" not in str(error):
            return "unsatisfiable", clause
        found = satisfiable(clause, model.backend().vocabulary)
        if not found:
            return ("dead end (undecided)" if found is None else "dead end (truly unsatisfiable)",
                    clause)
        after = re.search(r"after (b'.*'|b\".*\")", str(error))
        so_far = eval(after.group(1)) if after else b""
        kind = ("multi-byte" if _broken_utf8(so_far)
                else "budget" if "token budget" in str(error) or "TOKENS(X)) >" in clause
                or "TOKENS(X)) ==" in clause else "other")
        return f"dead end, proven satisfiable ({kind})", f"{clause}: {error}"
    except lmq.LmqError as error:
        return "refused", f"{clause}: {type(error).__name__}: {error}"
    except Exception as error:                    # noqa: BLE001 - every escape is counted
        return "crash", f"{clause}: {type(error).__name__}: {error}"
    value, tokens = result.variables["X"], result.tokens["X"]
    if isinstance(value, (int, float)):            # INT/FLOAT at the top level convert
        value = result.prompt[len("Start:"):]
    if not python_verdict(clause, value, tokens):
        return "violation", f"{clause}: {value!r} {tokens}"
    return "ok", clause


def _broken_utf8(data: bytes) -> bool:
    """Whether `data` is not well-formed UTF-8 (bytes lost or a character left open)."""
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def run_trials(trials: int, seed: str = "lmq-properties",
               vocabularies: list[Path] = VOCABULARIES) -> tuple[Counter, dict[str, list[str]]]:
    """(count per outcome, up to five details per outcome other than ok) of `trials`
    trials spread evenly over the vocabularies."""
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for index in range(trials):
        vocab = vocabularies[index % len(vocabularies)]
        rng = random.Random(f"{seed}-{index}")
        outcome, detail = run_trial(rng, vocab, index)
        counts[outcome] += 1
        if outcome != "ok" and len(examples.setdefault(outcome, [])) < 5:
            examples[outcome].append(f"[{vocab.stem}] {detail}"[:400])
    return counts, examples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--seed", default="lmq-properties")
    options = parser.parse_args()
    started = time.monotonic()
    counts, examples = run_trials(options.trials, options.seed)
    print(f"{options.trials} trials over {len(VOCABULARIES)} vocabularies in "
          f"{time.monotonic() - started:.0f} s")
    for outcome, count in sorted(counts.items()):
        print(f"  {outcome:45s} {count}")
    for outcome, details in sorted(examples.items()):
        print(f"\n{outcome}:")
        for detail in details:
            print(f"  {detail}")
    bad = sum(count for outcome, count in counts.items()
              if outcome in ("violation", "crash") or "proven satisfiable" in outcome)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
