"""Token budgets and forced text against brute force (issue 9).

- Forced text (fast-forward) is byte-exact when the chosen token ended inside a UTF-8
  character: the issue's reproducers on the random backend over real vocabularies.
- Budgets never dead-end while a value fits: the issue's reproducers, and two
  Hypothesis properties on small vocabularies (fragments of the options, split inside
  multi-byte characters, with or without every single byte as a token; or the tokens of
  a shared GGUF vocabulary found inside the options) where a brute force over all token
  sequences within the budget decides what is reachable:
  * the mask of every step, following random choices, is exactly the set of tokens
    after which some value ends at a count the budget allows (complete and sound);
  * the whole decoder (fast-forward included) on a synthetic backend ends every run
    with a value in the language within the budget, and raises UnsatisfiableConstraint
    exactly when the brute force finds no value.

CI runs a few hundred examples (seconds). The long run sets the example count:
`LMQ_PROPERTY_EXAMPLES=20000 python -m pytest tests/constraints/test_token_budget.py` (bench/README.md).
"""

from __future__ import annotations

import functools
import os
import random
import re

import numpy as np
import pytest
from conftest import PinnedModel
from hypothesis import HealthCheck, given, settings, strategies as st

import lmq
from lmq.backends.base import Backend, Sequence, Vocabulary
from lmq.constraints.hole_plan import HolePlan
from lmq.constraints.languages import value_dfa
from lmq.constraints.token_masks import DfaTokenAutomaton
from lmq.constraints.vocabulary_index import VocabularyIndex
from vocab_paths import vocab

LONG_RUN = int(os.environ.get("LMQ_PROPERTY_EXAMPLES", "0"))
PIECES = ["a", "b", " ", "\n", "9", "é", "日本語", "🙂"]
PATTERNS = [r"(ab)*", r"[ab]*é", r"9+", r"(日本|é)+ ?", r"a?b?🙂", r"(é|🙂)(a|b)*"]
FAMILIES = ["gpt-2", "qwen2", "llama-bpe", "phi-3", "llama-spm"]
JAPANESE = '"The Japanese phrase is:[X]" where X in ["日本語です", "x"]'


def examples(ci: int) -> settings:
    return settings(max_examples=LONG_RUN or ci, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def private_index_cache(tmp_path_factory):
    """Vocabulary indexes of the many small vocabularies go to a temporary cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


# --- the reproducers -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt-2", "qwen2", "llama-bpe", "phi-3", None])
def test_forced_text_after_a_token_inside_a_character_is_byte_exact(family):
    kwargs = {"vocab": vocab(family)} if family else {}
    split = 0
    for seed in range(40):
        model = lmq.model("random", seed=seed, **kwargs)
        result = lmq.run_sync(JAPANESE, model=model)
        value, tokens = result.variables["X"], result.tokens["X"]
        assert value in ("日本語です", "x")
        assert model.backend().detokenize(tokens) == value.encode("utf-8")
        table = model.backend().vocabulary.token_bytes
        split += any(_ends_inside_a_character(b"".join(table[t] for t in tokens[:i + 1]))
                     for i in range(len(tokens)))
    assert split > 0            # some runs did take a token ending inside a character


@pytest.mark.parametrize("family", [*FAMILIES, None])
def test_plain_masks_strand_no_text_on_gguf_vocabularies(family):
    """Any text: every state a token reaches ends on single-byte tokens (SmolLM2 lacks a
    few control bytes, which no token holds), so unbudgeted holes keep the plain masks."""
    kwargs = {"vocab": vocab(family)} if family else {}
    vocabulary = lmq.model("random", **kwargs).backend().vocabulary
    automaton = DfaTokenAutomaton(value_dfa(("regex", ".*")),
                                  VocabularyIndex.build(vocabulary.token_bytes), vocabulary.token_bytes)
    assert automaton.strands_nothing


@pytest.mark.parametrize("family,query,options", [
    (None, '"Order:[X]" where X in [" café au lait", " tea"] and len(TOKENS(X)) < 5',
     (" café au lait", " tea")),
    ("phi-3", '"Q:[X]" where X in ["9é\\n", "9é\\ne"] and len(TOKENS(X)) <= 3', ("9é\n", "9é\ne")),
])
def test_a_tight_budget_never_dead_ends_when_a_value_fits(family, query, options):
    kwargs = {"vocab": vocab(family)} if family else {}
    limit = 4 if "< 5" in query else 3
    for seed in range(100):
        result = lmq.run_sync(query, model=lmq.model("random", seed=seed, **kwargs))
        assert result.variables["X"] in options
        assert len(result.tokens["X"]) <= limit


def test_a_value_owing_tokens_takes_a_longer_tokenization(random_model):
    for seed in range(30):
        result = lmq.run_sync('"[X]" where X in [" café", " tea"] and len(TOKENS(X)) == 4',
                              model=random_model(seed))
        assert result.variables["X"] in (" café", " tea") and len(result.tokens["X"]) == 4


def test_a_budget_no_value_fits_is_unsatisfiable(random_model):
    with pytest.raises(lmq.UnsatisfiableConstraint, match=r"X .*within its token budget"):
        lmq.run_sync('"[X]" where X in [" café au lait"] and len(TOKENS(X)) < 2',
                     model=random_model())


# --- brute force on small vocabularies ---------------------------------------------------------


def _ends_inside_a_character(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


class BruteForce:
    """Which token sequences within the budget spell a value, by enumeration: a value is
    accepted by Python's own reading (`in` on the options, `re.fullmatch` on a pattern)."""

    def __init__(self, accepts, tokens: tuple[bytes, ...], plan: HolePlan, prune):
        self.accepts = accepts
        self.tokens = [(t, data) for t, data in enumerate(tokens) if data]
        self.plan = plan
        self.prune = prune            # prefixes no value starts with
        self.finishes = functools.lru_cache(maxsize=None)(self._finishes)

    def _finishes(self, prefix: bytes, count: int) -> bool:
        """Some j ≥ 0 more tokens make `prefix` a value with count + j tokens in budget."""
        plan = self.plan
        if plan.max_tokens is not None and count > plan.max_tokens:
            return False
        if self.prune(prefix):
            return False
        if plan.may_end_at(count) and self.accepts(prefix):
            return True
        return any(self.finishes(prefix + data, count + 1) for _, data in self.tokens)

    def allowed(self, prefix: bytes, count: int) -> list[int]:
        return [t for t, data in self.tokens if self.finishes(prefix + data, count + 1)]


def _utf8_start(data: bytes) -> bool:
    """Whether `data` is valid UTF-8 or a valid prefix of it."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"
    return True


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@st.composite
def budget_cases(draw):
    """(language key, Python acceptance, pruning, token bytes, plan bounds, seed): option
    lists over a synthetic or a real vocabulary (its tokens inside the options), or
    patterns over a synthetic one; synthetic tokens are fragments of the material, split
    inside characters, with every single byte or only some."""
    family = None
    if draw(st.booleans()):
        options = draw(st.lists(st.lists(st.sampled_from(PIECES), max_size=4).map("".join),
                                min_size=1, max_size=4, unique=True))
        encoded = [o.encode("utf-8") for o in options]
        key = ("in", tuple(sorted(set(encoded))))
        accepts = frozenset(encoded).__contains__

        def prune(prefix: bytes) -> bool:
            return not any(o.startswith(prefix) for o in encoded)

        material, size, high_choices = encoded, 24, [None, 1, 2, 3, 4, 5, 6]
        family = draw(st.sampled_from([None, *FAMILIES]))
    else:
        pattern = draw(st.sampled_from(PATTERNS))
        key = ("regex", pattern)
        alphabet = set(pattern) - set("()[]|*+?")

        def accepts(data: bytes) -> bool:
            text = _text(data)
            return text is not None and re.fullmatch(pattern, text) is not None

        def prune(prefix: bytes) -> bool:
            """Not the start of a text over the pattern's characters."""
            text = prefix.decode("utf-8", "ignore")
            return (text.encode("utf-8") != prefix[:len(text.encode("utf-8"))]
                    or not set(text) <= alphabet or not _utf8_start(prefix))

        material = [p.encode("utf-8") for p in PIECES if re.search(re.escape(p[0]), pattern)]
        material = material or [b"a"]
        size, high_choices = 9, [1, 2, 3, 4]
    if family is not None:
        inside = {m[i:j] for m in material for i in range(len(m)) for j in range(i + 1, len(m) + 1)}
        tokens = sorted(inside & _real_tokens(family))
    else:
        fragments = sorted({m[i:j] for m in material for i in range(len(m))
                            for j in range(i + 1, min(len(m), i + 7) + 1)})
        singles = sorted({bytes([b]) for m in material for b in m})
        chosen = draw(st.lists(st.sampled_from(fragments), max_size=size, unique=True)) if fragments else []
        if singles and draw(st.booleans()):         # only some single bytes: no byte shortcut
            singles = draw(st.lists(st.sampled_from(singles), unique=True))
        tokens = sorted(set(singles) | set(chosen))
    high = draw(st.sampled_from(high_choices))
    low = draw(st.integers(0, high if high is not None else 3))
    excluded = frozenset(draw(st.lists(st.integers(0, 6), max_size=2)))
    tokens = tuple(tokens) + (b"",)                   # the last: the end token
    return key, accepts, prune, tokens, (low, high, excluded), draw(st.integers(0, 2**16))


@functools.lru_cache(maxsize=None)
def _real_tokens(family: str) -> frozenset[bytes]:
    return frozenset(lmq.model("random", vocab=vocab(family)).backend().vocabulary.token_bytes)


def _plan(bounds) -> HolePlan:
    low, high, excluded = bounds
    return HolePlan("X", min_tokens=low, max_tokens=high, excluded_counts=excluded)


@examples(300)
@given(budget_cases())
def test_budget_masks_equal_brute_force_along_random_walks(case):
    key, accepts, prune, tokens, bounds, seed = case
    plan = _plan(bounds)
    automaton = DfaTokenAutomaton(value_dfa(key), VocabularyIndex.build(tokens), tokens)
    brute = BruteForce(accepts, tokens, plan, prune)
    rng = random.Random(seed)
    state, prefix, count = automaton.initial(), b"", 0
    while True:
        expected = brute.allowed(prefix, count)
        mask = automaton.budget_mask(state, plan.remaining(count))
        assert mask.allowed.tolist() == expected, (key, tokens, bounds, prefix, count)
        may_end = plan.may_end_at(count) and automaton.accepts(state)
        assert may_end == (plan.may_end_at(count) and accepts(prefix))
        if not expected and not may_end:
            # a dead end only where the brute force finds no value at all
            assert count == 0 and not brute.finishes(b"", 0), (key, tokens, bounds, prefix)
            return
        choice = rng.randrange(len(expected) + may_end)
        if choice == len(expected):
            return
        token = expected[choice]
        state = automaton.advance(state, token)
        prefix += tokens[token]
        count += 1


class SyntheticBackend(Backend):
    """A backend over a small vocabulary: seeded Gumbel logits, greedy longest-match
    tokenizer (a byte no token spells is skipped, so fast-forward must notice)."""

    context_size = 4096

    def __init__(self, tokens: tuple[bytes, ...], seed: int):
        self.vocabulary = Vocabulary(tokens, frozenset({len(tokens) - 1}), None,
                                     len(tokens) - 1, None, False)
        self.rng = np.random.default_rng(seed)
        self.by_bytes = {data: t for t, data in enumerate(tokens) if data}
        self.longest = max(map(len, tokens))
        self.contexts: list[list[int]] = []         # every token list asked for logits

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        data, out, at = text.encode("utf-8"), [], 0
        while at < len(data):
            for size in range(min(self.longest, len(data) - at), 0, -1):
                token = self.by_bytes.get(data[at:at + size])
                if token is not None:
                    out.append(token)
                    at += size
                    break
            else:
                at += 1
        return out

    def token_text(self, token: int) -> str:
        return self.vocabulary.token_bytes[token].decode("utf-8", "replace")

    def sequence(self) -> Sequence:
        return SyntheticSequence(self)


class SyntheticSequence(Sequence):
    def __init__(self, backend: SyntheticBackend):
        super().__init__()
        self.backend = backend

    def _row(self) -> np.ndarray:
        return self.backend.rng.gumbel(size=self.backend.vocabulary.size).astype(np.float32)

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.tokens = list(tokens)
        self.backend.contexts.append(self.tokens)
        return self._row()

    def advance(self, token: int) -> np.ndarray:
        self.tokens.append(token)
        return self._row()

    def fork(self) -> "SyntheticSequence":
        child = SyntheticSequence(self.backend)
        child.tokens = list(self.tokens)
        return child

    def release(self) -> None:
        self.tokens = []


def test_a_stop_cut_inside_a_token_keeps_the_prompt_byte_exact():
    """"é" spelled b"\xc3" + b"\xa9.": STOPS_BEFORE cuts the second token, so the prompt
    keeps the first token only if what follows starts a whole character: the context of
    the next hole spells exactly the prompt text."""
    tokens = (b"\xc3", b"\xa9.", b"\xa9", b"!", b"")
    cuts = 0
    for seed in range(20):
        backend = SyntheticBackend(tokens, seed)
        result = lmq.run_sync('"[X]![Y]" where X in ["é"] and STOPS_BEFORE(X, ".") '
                              'and len(TOKENS(Y)) == 1', model=PinnedModel(backend))
        assert result.variables["X"] == "é"
        cuts += result.tokens["X"] == [0, 1]
        assert backend.detokenize(backend.contexts[-1]) == "é!".encode("utf-8")
    assert cuts > 0


def _clause(key, bounds) -> str:
    low, high, excluded = bounds
    kind, argument = key
    clause = ("X in options" if kind == "in" else "REGEX(X, pattern)") + f" and len(TOKENS(X)) >= {low}"
    if high is not None:
        clause += f" and len(TOKENS(X)) <= {high}"
    return clause + "".join(f" and len(TOKENS(X)) != {n}" for n in sorted(excluded))


@examples(150)
@given(budget_cases())
def test_decoding_ends_in_a_value_within_budget_exactly_when_one_exists(case):
    key, accepts, prune, tokens, bounds, seed = case
    plan = _plan(bounds)
    satisfiable = BruteForce(accepts, tokens, plan, prune).finishes(b"", 0)
    backend = SyntheticBackend(tokens, seed)
    arguments = ({"options": [o.decode("utf-8") for o in key[1]]} if key[0] == "in"
                 else {"pattern": key[1]})
    query = f'"[X]" where {_clause(key, bounds)}'
    try:
        result = lmq.run_sync(query, model=PinnedModel(backend), **arguments)
    except lmq.UnsatisfiableConstraint:
        assert not satisfiable, (query, arguments, tokens)
        return
    assert satisfiable
    value, generated = result.variables["X"], result.tokens["X"]
    assert accepts(value.encode("utf-8")), (query, arguments, value)
    assert backend.detokenize(generated) == value.encode("utf-8")
    assert plan.may_end_at(len(generated)) and (bounds[1] is None or len(generated) <= bounds[1])
