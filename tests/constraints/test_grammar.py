"""GRAMMAR constraints: lmq's GBNF checks agree with llama.cpp's parser, and
`GrammarTokenAutomaton` (llguidance) enforces exactly llama.cpp's GBNF semantics: at
every step of random walks its mask equals the token set llama.cpp's grammar sampler
allows, and it accepts exactly where llama.cpp allows end-of-sequence. Real SmolLM2,
qwen2 and llama-spm vocabularies; llama.cpp through llama-cpp-python."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llama_grammar import LlamaGrammar, checked_walk
import lmq
from lmq.backends import default_model_path
from lmq.compiler.ast import Expression, Span
from lmq.compiler.constraints import WhereCompiler
from lmq.backends.gguf import load_vocab_only
from lmq.constraints.gbnf import parse_gbnf
from lmq.constraints.grammar_automaton import GrammarTokenAutomaton
from lmq.constraints.hole_plan import HoleOutput
from lmq.constraints import gbnf, llguidance_lark
from lmq.constraints.json_schema import schema_to_gbnf
from lmq.constraints.llguidance_lark import choose_lexemes
from lmq.errors import ConstraintError, UnsatisfiableConstraint
from lmq.runtime.hole import plan_hole
from lmq.runtime.interpreter import _grammar_accepts
from vocab_paths import vocab

VOCABULARIES = {
    "smollm2": default_model_path(),
    "qwen2": vocab("qwen2"),
    "llama-spm": vocab("llama-spm"),
}


@pytest.fixture(scope="module")
def vocabularies():
    loaded = {name: load_vocab_only(path) for name, path in VOCABULARIES.items()}
    return {name: (gguf, gguf.vocabulary()) for name, gguf in loaded.items()}


# --- the parser agrees with llama.cpp on what is a grammar -------------------------------

INVALID = [
    ('root ::= "a', "unterminated string literal"),
    ("root ::= [a-", "unterminated character class"),
    ('root ::= ("a"', "expected ')'"),
    ('root ::= "a" b', "rule 'b' is used but never defined"),
    ('start ::= "a"', "no 'root' rule"),
    ('root = "a"', "expected '::='"),
    ('root ::= *"a"', "'*' must follow an item"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\x4"', "needs 2 hex digits"),
    ('root ::= "a"{2,1}', "maximum is below the minimum"),
    ('root ::= "a"{3001}', "over 2000"),
    ("root ::= root \"a\" | \"b\"", "left-recursive"),
    ('root ::= x\nx ::= y "a"\ny ::= "b"? x', "left-recursive"),
    ('root ::= ("a"?)*', "may be empty"),
    ('root ::= <[42]>', "token references"),
    ('root ::= "a" )', "expected a newline"),
]


#: token references need a vocabulary in llama.cpp (lmq refuses them: it constrains text);
#: llama.cpp loops forever on a repetition whose maximum is below its minimum; its left
#: recursion check misses a starred item that may be empty (infinitely many derivations
#: of the empty string), which lmq refuses
LLAMA_CPP_DIFFERS = {"token references", "maximum is below the minimum", "may be empty"}


@pytest.mark.parametrize("text,message", INVALID)
def test_invalid_grammars_are_named_errors_that_llama_cpp_also_rejects(vocabularies, text, message):
    with pytest.raises(ConstraintError, match="GRAMMAR") as error:
        parse_gbnf(text)
    assert message in str(error.value)
    if message not in LLAMA_CPP_DIFFERS:
        assert not LlamaGrammar(vocabularies["smollm2"][0], text).valid


def test_llama_cpp_quirks_lmq_refuses_loudly():
    """llama.cpp reads an empty class as the empty string and keeps the last of two
    definitions; both are almost surely mistakes, so lmq names them."""
    with pytest.raises(ConstraintError, match="empty character class"):
        parse_gbnf('root ::= "a" []')
    with pytest.raises(ConstraintError, match="defined twice"):
        parse_gbnf('root ::= x\nx ::= "a"\nx ::= "b"')
    with pytest.raises(ConstraintError, match="must be a string"):
        parse_gbnf(42)


def test_an_empty_language_is_unsatisfiable():
    with pytest.raises(UnsatisfiableConstraint, match="derives no string"):
        parse_gbnf('root ::= "a" x\nx ::= "b" x')


def test_error_positions_name_line_and_column():
    with pytest.raises(ConstraintError) as error:
        parse_gbnf('root ::= x\nx ::= "a" | [b-\n', owner="GRAMMAR(X)")
    assert "GRAMMAR(X): invalid GBNF at line 2, column 13: unterminated character class" \
        in str(error.value)


# --- the automaton enforces llama.cpp's semantics exactly --------------------------------

GRAMMARS = {
    # greedy lexing would lose "aaa" (x takes every a): the translation must not
    "greedy-trap": 'root ::= x "a"\nx ::= [a]*',
    "split-words": "root ::= w w\nw ::= [a-z]+",
    "arithmetic": 'root ::= expr\nexpr ::= term ([-+*/] term)*\n'
                  'term ::= [0-9]+ | "(" expr ")"',
    "json-ish": 'root ::= value\nvalue ::= obj | arr | str | num | "true" | "false" | "null"\n'
                'obj ::= "{" (str ":" value ("," str ":" value)*)? "}"\n'
                'arr ::= "[" (value ("," value)*)? "]"\n'
                'str ::= "\\"" ([^"\\\\\\x00-\\x1f] | "\\\\" ["\\\\nt])* "\\""\n'
                'num ::= "-"? ([0-9] | [1-9] [0-9]{1,5}) ("." [0-9]{1,3})?',
    "unicode": 'root ::= "é" [α-ω]{1,3} ("😀" | [^a-z\\x00-\\x1f]) "."',
    "keywords": 'root ::= ("if" | "in" | "int" | "i") (" " ("x" | "xy" | "xyz"))*',
}


@pytest.mark.parametrize("vocab_name", list(VOCABULARIES))
@pytest.mark.parametrize("grammar_name", list(GRAMMARS))
def test_masks_equal_llama_cpp_grammar_sampler(vocabularies, vocab_name, grammar_name):
    gguf, vocabulary = vocabularies[vocab_name]
    text = GRAMMARS[grammar_name]
    automaton = GrammarTokenAutomaton(parse_gbnf(text), vocabulary, variable="X")
    finished = 0
    walks, steps = (3, 12) if vocabulary.size > 100_000 else (5, 16)
    for seed in range(walks):
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        finished += checked_walk(automaton, LlamaGrammar(gguf, text), vocabulary, rng, steps, tokens)
    assert finished >= 1, "no walk reached an accepting state"


def test_greedy_trap_accepts_every_split(vocabularies):
    """`x ::= [a]*` then "a": llama.cpp accepts "aaa"; so must lmq, token by token."""
    gguf, vocabulary = vocabularies["smollm2"]
    automaton = GrammarTokenAutomaton(parse_gbnf(GRAMMARS["greedy-trap"]), vocabulary, variable="X")
    a = vocabulary.token_bytes.index(b"a")
    state = automaton.initial()
    for _ in range(3):
        assert a in automaton.mask(state)
        state = automaton.advance(state, a)
    assert automaton.accepts(state)


def test_json_grammar_reads_as_one_lexeme_and_split_words_do_not():
    """The lexeme choice: a JSON value is prefix-free (one lexeme); `[a-z]+` is not; in a
    recursive grammar the string rule is, and nothing else reads a lone quote."""
    assert choose_lexemes(parse_gbnf(GRAMMARS["json-ish"]).rules) == {"str"}
    assert choose_lexemes(parse_gbnf('root ::= "{" [a-z]* "}"').rules) == {"root"}
    assert choose_lexemes(parse_gbnf(GRAMMARS["split-words"]).rules) == set()
    assert choose_lexemes(parse_gbnf('root ::= s s\ns ::= "\\"" [a-z]* "\\""').rules) == {"root"}
    assert choose_lexemes(parse_gbnf('root ::= s+\ns ::= "\\"" [a-z]* "\\""').rules) == {"s"}


LEXEME_CASES = [*GRAMMARS.values(),
                'root ::= "a" | "ab"', 'root ::= [0-9] | [1-9] [0-9]{0,3} ","',
                'root ::= x y\nx ::= "[" [a-z]{0,3} "]"\ny ::= "[" | "(" [a-z]* ")"',
                'root ::= s ("," s)*\ns ::= "\\"" [a-c]{0,4} "\\""',
                'root ::= k+\nk ::= "ab" | "a" "c"', 'root ::= "x" [a-z]? [a-y]? "."',
                *(schema_to_gbnf(schema) for schema in (
                    {"type": "object", "properties": {"n": {"type": "integer"},
                                                      "s": {"type": "string", "maxLength": 5}}},
                    {"type": "array", "items": {"type": "number"}, "maxItems": 3},
                    {"enum": ["a", "ab", 1, 12]}, {"type": "integer"}))]


@pytest.mark.parametrize("text", LEXEME_CASES)
def test_prefix_free_proof_agrees_with_the_product_construction(text, monkeypatch):
    """The Glushkov proof only shortcuts the product construction: the lexemes chosen
    with it are those chosen without it."""
    rules = parse_gbnf(text).rules
    chosen = choose_lexemes(rules)
    monkeypatch.setattr(llguidance_lark, "_proven_prefix_free", lambda *args: False)
    assert choose_lexemes(rules) == chosen


def _random_grammar(rng: random.Random) -> str:
    """Rules r0..r3, each referring only to later ones, built from literals, classes,
    groups, alternatives and repetitions over "abcde"; most rules are delimited by "x" …
    "y" (prefix-free as JSON values are, unless their body reads "y"), the rest not."""
    def item(rule: int, depth: int) -> str:
        kind = rng.randrange(6 if depth < 2 else 3)
        if kind == 0 or (kind == 2 and rule == 3):
            text = '"' + "".join(rng.choice("abcde") for _ in range(rng.randint(1, 3))) + '"'
        elif kind == 1:
            text = rng.choice(["[a-b]", "[bc]", "[d-e]", "[c]", "[^x-y]"])
        elif kind == 2:
            text = f"r{rng.randint(rule + 1, 3)}"
        else:
            text = "(" + " | ".join(sequence(rule, depth + 1) for _ in range(rng.randint(1, 2))) + ")"
        return text + rng.choice(["", "", "", "?", "*", "+", "{2}", "{0,2}"] if kind < 2 else
                                 ["", "", "?", "*"])

    def sequence(rule: int, depth: int) -> str:
        return " ".join(item(rule, depth) for _ in range(rng.randint(1, 2)))

    def body(rule: int) -> str:
        text = " | ".join(sequence(rule, 0) for _ in range(rng.randint(1, 2)))
        return f'"x" ({text}) "y"' if rng.random() < 0.7 else text

    rules = [f"r{i} ::= {body(i)}" for i in range(4)]
    return f"root ::= {sequence(-1, 1)} r0\n" + "\n".join(rules)


def test_prefix_free_proof_agrees_on_random_grammars(monkeypatch):
    """On random grammars the lexemes chosen with the proof are those chosen without it,
    and the proof settles a fair share of the choices."""
    proofs: list[bool] = []
    proof = llguidance_lark._proven_prefix_free

    def recorded(*args):
        proofs.append(proof(*args))
        return proofs[-1]

    checked = 0
    for seed in range(100):
        try:
            rules = parse_gbnf(_random_grammar(random.Random(seed))).rules
        except ConstraintError:
            continue
        with monkeypatch.context() as patch:
            patch.setattr(llguidance_lark, "_proven_prefix_free", recorded)
            chosen = choose_lexemes(rules)
        with monkeypatch.context() as patch:
            patch.setattr(llguidance_lark, "_proven_prefix_free", lambda *args: False)
            assert choose_lexemes(rules) == chosen, seed
        checked += 1
    assert checked >= 70 and sum(proofs) >= 20, (checked, sum(proofs), len(proofs))


def test_prefix_free_proof_refuses_what_is_not_prefix_free():
    def proven(text: str, single: str) -> bool:
        rules = parse_gbnf(text).rules
        return llguidance_lark._proven_prefix_free(rules, {"a"}, ((ord(single), ord(single)),),
                                                   gbnf.nullable_rules(rules))

    assert not proven('root ::= a "," a\na ::= "x" | "xy"', ",")
    assert not proven('root ::= a "," a\na ::= "x" "y"? ";"', "x")     # "x" starts a lexeme
    assert not proven('root ::= a "," a\na ::= "y"? "x" ";"', "x")     # after an optional "y"
    assert proven('root ::= a "," a\na ::= "x" "y"? ";"', ",")


def test_forced_bytes_and_fork(vocabularies):
    _, vocabulary = vocabularies["smollm2"]
    automaton = GrammarTokenAutomaton(parse_gbnf('root ::= "{\\"key\\":" [0-9] "}"'), vocabulary,
                                      variable="X")
    state = automaton.initial()
    assert automaton.forced(state) == b'{"key":'
    brace = vocabulary.token_bytes.index(b"{")
    assert brace in automaton.mask(state)           # not only the canonical tokenization
    copy = automaton.fork(state)
    state = automaton.advance(state, brace)
    assert automaton.forced(state) == b'"key":'
    assert automaton.forced(copy) == b'{"key":'     # the fork did not move


def test_unsatisfiable_at_run_time_names_the_variable(vocabularies):
    """A class excluding every character parses (llama.cpp accepts it) but no token fits."""
    _, vocabulary = vocabularies["llama-spm"]
    grammar = parse_gbnf('root ::= "a" [^\\x00-\\U0010FFFF]')
    automaton = GrammarTokenAutomaton(grammar, vocabulary, variable="CODE")
    with pytest.raises(UnsatisfiableConstraint, match="CODE"):
        automaton.mask(automaton.initial())     # "a" leads nowhere, so it is not allowed


@pytest.mark.model
def test_grammar_hole_on_smollm2_yields_a_string_llama_cpp_accepts():
    import lmq
    from gbnf_check import GbnfOracle

    grammar = 'root ::= [A-Z] [a-z]+ (", " [A-Z] [a-z]+){2} "."'
    result = lmq.run_sync('"Three cities in France: [CITIES]" where GRAMMAR(CITIES, grammar)',
                          grammar=grammar)
    assert GbnfOracle().accepts(grammar, result.variables["CITIES"].encode())


def test_the_finished_value_is_replayed_through_the_grammar():
    """The interpreter's soundness re-check of a grammar hole (`_grammar_accepts`, which
    replays the tokens without computing masks) accepts a derived value and refuses a
    token the grammar does not allow, and an unfinished value."""
    backend = lmq.model("random", seed=1).backend()
    text = "GRAMMAR(X, G)"
    where = WhereCompiler(frozenset({"X"}), "<test>", text).compile(Expression(text, Span(0, len(text), 1, 1)))
    plan = plan_hole("X", where, {"G": 'root ::= "ab" [0-9]+ "."'}, backend.vocabulary)

    def accepts(value: str) -> bool:
        tokens = [t for ch in value for t in backend.tokenize(ch)]
        return _grammar_accepts(plan, HoleOutput(tokens, value.encode(), "end", 0.0))

    assert accepts("ab12.")
    assert not accepts("ab1x.")
    assert not accepts("ab12")
