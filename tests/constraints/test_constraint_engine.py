"""The constraint engine end to end: random combinations of every regular constraint on the
random backend over the five shared vocabularies (soundness, checked by an independent
Python reading of the where clause), typed holes, fast-forward, unsatisfiable constraints,
the soundness net, and `lmq compile --gbnf`."""

import random
import re
import subprocess
import sys

import pytest

import lmq
from lmq.backends.base import Sequence
from lmq.constraints.languages import TYPE_PATTERNS

from constraint_trials import python_verdict, random_clause
from vocab_paths import VOCAB_DIR

VOCABULARIES = sorted(VOCAB_DIR.glob("*.gguf"))
COMBINATIONS_PER_VOCABULARY = 250


@pytest.mark.parametrize("vocab", VOCABULARIES, ids=lambda p: p.stem)
def test_random_constraint_combinations_are_sound(vocab):
    rng = random.Random(f"lmq-{vocab.stem}")
    produced = unsatisfiable = 0
    for i in range(COMBINATIONS_PER_VOCABULARY):
        clause = random_clause(rng)
        model = lmq.model("random", vocab=str(vocab), seed=i, end_probability=0.3)
        try:
            result = lmq.run_sync(f'"Start:[X]" where {clause}', model=model)
        except lmq.UnsatisfiableConstraint:
            unsatisfiable += 1
            continue
        value, tokens = result.variables["X"], result.tokens["X"]
        if isinstance(value, (int, float)):        # INT/FLOAT at the top level convert
            value = result.prompt[len("Start:"):]
        assert python_verdict(clause, value, tokens), (clause, value, tokens)
        produced += 1
    assert produced > 0.6 * COMBINATIONS_PER_VOCABULARY, (produced, unsatisfiable)


def test_options_are_reached_through_every_tokenization(random_model):
    options = [" apple pie", " apple", " banana"]
    seen = set()
    tokenizations = set()
    for seed in range(60):
        result = lmq.run_sync('"Pick:[X]" where X in options', options=options,
                              model=random_model(seed, end_probability=0.5))
        assert result.variables["X"] in options
        seen.add(result.variables["X"])
        tokenizations.add(tuple(result.tokens["X"]))
    assert seen == set(options)
    assert len(tokenizations) > len(options)        # not only the canonical tokenization


def test_typed_holes_give_typed_values(random_model):
    for seed in range(20):
        result = lmq.run_sync('"[N: int] [F: float] [D: r\'[0-9]{2}-[a-z]{3}\']"\n'
                              'return N, F, D', model=random_model(seed, end_probability=0.5))
        number, real, date = result
        assert type(number) is int and type(real) is float
        assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", date)


def test_int_in_the_where_clause_converts_the_value_and_keeps_the_text(random_model):
    result = lmq.run_sync('"n =[N]" where INT(N) and len(TOKENS(N)) < 5', model=random_model(3))
    assert type(result.variables["N"]) is int
    assert result.prompt == "n =" + result.prompt[3:] and int(result.prompt[3:]) == result.variables["N"]


class CountingSequence(Sequence):
    """Wraps a sequence and counts one-token steps and batch evaluations."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.steps, self.batches = inner, 0, []

    def logits(self, tokens):
        self.batches.append(len(tokens) - len(self.inner.tokens))
        return self.inner.logits(tokens)

    def advance(self, token):
        self.steps += 1
        return self.inner.advance(token)

    def fork(self):
        return self.inner.fork()

    def release(self):
        self.inner.release()


def test_forced_text_is_fast_forwarded_in_one_batch(pinned_model):
    backend = lmq.model("random", seed=1).backend()
    counters = []
    make = backend.sequence

    def sequence():
        counters.append(CountingSequence(make()))
        return counters[-1]

    backend.sequence = sequence
    option = " the quick brown fox jumps over the lazy dog"
    result = lmq.run_sync('"Say:[X]" where X in [" the quick brown fox jumps over the lazy dog"]',
                          model=pinned_model(backend))
    assert result.variables["X"] == option
    counter = counters[-1]
    generated = len(result.tokens["X"])
    assert generated >= 8
    assert counter.steps < generated / 2                # most tokens were not decoded one by one
    assert max(counter.batches) >= generated / 2        # they were evaluated as one batch


def test_unsatisfiable_constraints_name_the_variable(random_model):
    for query in ['"[X]" where X in ["a"] and X in ["b"]',
                  '"[X]" where INT(X) and REGEX(X, r"[a-z]+")',
                  '"[X]" where len(TOKENS(X)) < 1 and X == "a"',
                  '"[X]" where len(X) > 3 and len(X) < 2']:
        with pytest.raises(lmq.UnsatisfiableConstraint, match=r"\bX\b"):
            lmq.query(query)                          # at compile time: literal operands
    with pytest.raises(lmq.UnsatisfiableConstraint, match=r"\bY\b"):
        lmq.run_sync('"[Y]" where Y in a and Y in b', a=["x"], b=["y"], model=random_model())


def test_the_soundness_check_stays_on(random_model, monkeypatch):
    """An engine that let a wrong value through is caught by the re-check."""
    from lmq.constraints import byte_dfa, hole_plan
    from lmq.constraints.vocabulary_cache import clear_caches

    monkeypatch.setattr(hole_plan, "stopped_dfa", lambda key, stops: byte_dfa.any_bytes())
    clear_caches()
    with pytest.raises(lmq.ConstraintViolation, match="X"):
        for seed in range(5):
            lmq.run_sync('"[X]" where X in [" yes", " no"] and len(TOKENS(X)) < 4',
                         model=random_model(seed))
    clear_caches()


def test_unsupported_combinations_are_named(random_model):
    with pytest.raises(lmq.ConstraintError, match=r"len\(TOKENS\(X\)\) < 3"):
        lmq.run_sync('"[X]" where len(TOKENS(X)) < 3 or INT(X)', model=random_model())
    with pytest.raises(lmq.ConstraintError, match="several holes"):
        lmq.run_sync('"[X][Y]" where INT(X) or INT(Y)', model=random_model())
    with pytest.raises(lmq.ConstraintError, match="unsupported|not supported|lookahead|anchor"):
        lmq.run_sync('"[X]" where REGEX(X, r"(?=a)a")', model=random_model())


def test_compile_gbnf_prints_grammar_budget_and_stops(tmp_path):
    query = tmp_path / "q.lmq"
    query.write_text('"A:[ANSWER]" where STOPS_AT(ANSWER, ".") and len(TOKENS(ANSWER)) < 30\n'
                     '"[N: int] [C]" where C in [" red", " green"]\n'
                     '"[P]" where P in options\n')
    done = subprocess.run([sys.executable, "-m", "lmq.cli", "compile", str(query), "--gbnf"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sections = done.stdout.split("# hole ")[1:]
    assert len(sections) == 4
    assert "0 to 29 tokens" in sections[0] and "STOPS_AT '.'" in sections[0]
    assert "root ::=" in sections[1] and '"green"' in sections[2]
    assert "run-time values" in sections[3]


GBNF_CASES = ['X in [" yes", " no", " maybe so"]', 'X != " no"', 'X not in ["a", "b"]',
              '"e" in X', 'not "e" in X', 'len(X) <= 4', 'INT(X)', 'FLOAT(X)',
              'REGEX(X, r"[a-z]+(-[a-z]+)?")', 'STOPS_AT(X, ".")', 'STOPS_BEFORE(X, ", ")',
              '(INT(X) or X in [" none"]) and not X == "0"',
              'GRAMMAR(X, \'root ::= "(" [a-c]* ")"\')',
              'JSON(X, {"type": "array", "items": {"type": "boolean"}})']


@pytest.mark.parametrize("clause", GBNF_CASES)
def test_values_the_engine_makes_are_accepted_by_llama_cpp_for_the_exported_grammar(clause, random_model):
    """The grammar `lmq compile --gbnf` prints accepts every value the mask engine lets the
    decoder produce (checked by llama.cpp's own GBNF engine)."""
    from gbnf_check import GbnfOracle
    from lmq.compiler.codegen import compile_query
    from lmq.runtime.hole import static_plan

    oracle = GbnfOracle()
    query = f'"Start:[X]" where {clause} and len(TOKENS(X)) < 10'
    grammar = static_plan(compile_query(query).holes[0]).gbnf()
    values = set()
    for seed in range(15):
        try:
            result = lmq.run_sync(query, model=random_model(seed, end_probability=0.3))
        except lmq.UnsatisfiableConstraint:        # the token budget ran out before a value
            continue
        values.add(result.prompt[len("Start:"):])
    assert values
    for value in values:
        assert oracle.accepts(grammar, value.encode("utf-8")), (clause, value, grammar)


def test_a_minimum_token_count_never_dead_ends_a_finite_branch(random_model):
    """`INT(X) and len(TOKENS(X)) == 4`: a leading "0" ends INT, so it is masked while
    tokens are still owed."""
    for seed in range(80):
        result = lmq.run_sync('"N: [X]" where INT(X) and len(TOKENS(X)) == 4', model=random_model(seed))
        assert len(result.tokens["X"]) == 4
        assert re.fullmatch(TYPE_PATTERNS["INT"], result.prompt[len("N: "):])


@pytest.mark.parametrize("where, scope", [
    ('X in [" yes", " no"]', {}),
    ("JSON(X, S)", {"S": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                          "required": ["ok"]}}),
    ("GRAMMAR(X, G)", {"G": 'root ::= " yes" | " no"'}),
    ("GRAMMAR(X, G)", {"G": 'root ::= ("yes" | "no") "!"'}),
], ids=["in", "json", "grammar", "grammar-forced-end"])
def test_a_value_nothing_can_extend_ends_without_another_decode(where, scope, pinned_model,
                                                                 monkeypatch):
    """A DFA's complete state, a closed JSON document, a grammar whose matcher stopped:
    the hole ends on the token (chosen or forced) that completed it."""
    monkeypatch.setenv("LMQ_NO_SPECULATION", "1")    # a rejected guess is one more evaluation
    backend = lmq.model("random", seed=2).backend()
    result = lmq.run_sync(f'"Pick:[X]" where {where}', model=pinned_model(backend), **scope)
    vocabulary = backend.vocabulary
    context = [vocabulary.bos_id] * vocabulary.add_bos + backend.tokenize("Pick:")
    # the prompt and every generated token but the last were evaluated: the last one
    # completed the value, and no end token had to be decoded after it
    assert backend.evaluated_tokens == len(context) + len(result.tokens["X"]) - 1


def lmq_imports(package: str) -> set[tuple[str, str]]:
    """(file, imported lmq module) for every import in lmq/<package>/*.py."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "lmq" / package
    imported = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmq"):
                imported.add((path.name, node.module))
            elif isinstance(node, ast.Import):
                imported.update((path.name, a.name) for a in node.names if a.name.startswith("lmq"))
    return imported


def test_the_engine_package_depends_only_on_errors_and_the_vocabulary():
    """lmq/constraints imports no runtime, compiler or server module: lowering the where
    clause is the runtime's, the engine sees only plans and the vocabulary."""
    allowed = ("lmq.constraints", "lmq.errors", "lmq.backends.base")
    imported = lmq_imports("constraints")
    assert len({f for f, _ in imported}) > 10
    assert [(f, m) for f, m in sorted(imported) if not m.startswith(allowed)] == []


def test_backends_import_nothing_from_the_runtime():
    """Data flows one way: the runtime drives backends; a backend (LMTP, llama-server,
    OpenAI-compatible engines) needs only the engine's plans and the sampling knobs."""
    imported = lmq_imports("backends")
    assert any(m == "lmq.backends.sampling_settings" for _, m in imported)
    assert [(f, m) for f, m in sorted(imported) if m.startswith(("lmq.runtime", "lmq.serve"))] == []


def test_every_engine_automaton_has_what_the_token_automaton_protocol_states():
    """The decoder asks an automaton only what `TokenAutomaton` states, without probing:
    every automaton the engine builds has each member, and those that keep a budget
    exactly have `BudgetedTokenAutomaton`'s too."""
    import inspect
    from pathlib import Path

    from lmq.constraints.char_budget import CharBudgetAutomaton
    from lmq.constraints.grammar_automaton import GrammarTokenAutomaton
    from lmq.constraints.token_automaton import BudgetedTokenAutomaton, TokenAutomaton
    from lmq.constraints.token_masks import DfaTokenAutomaton

    def members(protocol):
        own = set(vars(protocol)) | set(getattr(protocol, "__annotations__", {}))
        return {m for m in own if not m.startswith("_")}

    stated, budgeted = members(TokenAutomaton), members(BudgetedTokenAutomaton)
    assert {"initial", "mask", "advance", "accepts", "forced", "fork", "exact_budget",
            "strands_nothing"} <= stated and {"budget_mask", "can_finish"} <= budgeted
    for cls in (DfaTokenAutomaton, CharBudgetAutomaton, GrammarTokenAutomaton):
        assert [m for m in stated if not hasattr(cls, m)] == [], cls
        assert isinstance(cls.exact_budget, bool), cls
        if cls.exact_budget:
            assert [m for m in budgeted if not hasattr(cls, m)] == [], cls
    decoder = Path(inspect.getfile(lmq.runtime.decoders)).read_text()
    assert "getattr(automaton" not in decoder and "hasattr(automaton" not in decoder
