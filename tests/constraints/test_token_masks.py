"""Token masks of byte DFAs over vocabularies: exact against brute force on a synthetic
vocabulary, equal to a per-token walk on the five shared GGUF vocabularies, the disk
cache of the vocabulary index, and the mask's sparse and dense forms (applied to a logits
row in tests/constraints/test_token_choice.py)."""

from __future__ import annotations

import glob
import os
import random
import subprocess
import sys
from collections import deque

import numpy as np
import pytest

from lmq.backends.base import Vocabulary
from lmq.backends.gguf import load_vocab_only
from lmq.constraints import byte_dfa as automaton
from lmq.constraints import token_choice, token_masks
from lmq.constraints.byte_dfa import ByteDfa
from lmq.constraints.class_patterns import ClassPatterns
from lmq.constraints.regex import INT_PATTERN, regex_dfa
from lmq.constraints.token_masks import DfaTokenAutomaton, TokenMask
from lmq.constraints.vocabulary_index import (VocabularyIndex, cache_directory, vocabulary_index,
                                              vocabulary_key)

VOCABULARIES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                             "vocab", "*.gguf")))


def coreachable(transitions: np.ndarray, goals: set[int]) -> set[int]:
    """States from which some byte string reaches a goal state (BFS on reversed edges)."""
    predecessors: dict[int, set[int]] = {}
    for source, row in enumerate(transitions.tolist()):
        for target in row:
            predecessors.setdefault(target, set()).add(source)
    seen, queue = set(goals), deque(goals)
    while queue:
        for source in predecessors.get(queue.popleft(), ()):
            if source not in seen:
                seen.add(source)
                queue.append(source)
    return seen


def make_dfa(n_states: int, edges: dict[tuple[int, int], int], accepting=(), exits=(),
             initial: int = 1) -> tuple[ByteDfa, ByteDfa]:
    """(raw, trimmed) random DFAs from byte edges (missing edges go to DEAD = 0), exit
    states made absorbing; the trimmed one, which the engine gets, has every state that
    cannot reach a goal replaced by DEAD (the ByteDfa invariant), state numbers kept."""
    table = np.zeros((n_states, 256), dtype=np.int32)
    for (state, byte), target in edges.items():
        table[state, byte] = target
    for state in exits:
        table[state, :] = state
    flags = [np.isin(np.arange(n_states), list(states)) for states in (accepting, exits)]
    raw = ByteDfa(table, flags[0], flags[1], initial)
    alive = coreachable(table, set(accepting) | set(exits)) - {0}
    dead = np.array([s not in alive for s in range(n_states)])
    trimmed_table = np.where(dead[table], 0, table).astype(np.int32)
    trimmed_table[dead] = 0
    trimmed = ByteDfa(trimmed_table, flags[0] & ~dead, flags[1] & ~dead,
                  initial if initial in alive else 0)
    return raw, trimmed


def stops_at(phrase: str) -> ByteDfa:
    return automaton.with_stops(automaton.any_bytes(), [(phrase.encode(), True)])


class ColumnWalk:
    """Reference masks without the trie: every token's bytes as a row of a padded matrix,
    walked one byte column at a time over the tokens long enough (DEAD and exit states
    are absorbing, so the final state says whether the walk ever died)."""

    def __init__(self, token_bytes):
        lengths = np.array([len(data) for data in token_bytes])
        self.longest_first = np.argsort(-lengths, kind="stable")
        self.longer_than = [int((lengths > d).sum()) for d in range(int(lengths.max()))]
        self.columns = np.zeros((len(token_bytes), len(self.longer_than)), dtype=np.uint8)
        for token, data in enumerate(token_bytes):
            self.columns[token, :len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.nonempty = lengths > 0

    def mask(self, dfa, state: int) -> list[int]:
        states = np.full(len(self.nonempty), state, dtype=np.int64)
        for depth, count in enumerate(self.longer_than):
            tokens = self.longest_first[:count]
            states[tokens] = dfa.transitions[states[tokens], self.columns[tokens, depth]]
        return np.flatnonzero((states != 0) & self.nonempty).tolist()


def synthetic_vocabulary(rng: random.Random, size: int = 400) -> Vocabulary:
    """Random tokens over a few letters and multi-byte UTF-8 characters, whole and split
    between tokens, plus empty control tokens and duplicates."""
    pieces = [b"a", b"b", b"x", b" ", b"\n", "é".encode(), "€".encode(), b"\xc3", b"\xa9",
              b"\xe2", b"\x82\xac", b"\xe2\x82", b"\xac"]
    tokens = [bytes([b]) for b in sorted(set(b"".join(pieces)))]
    while len(tokens) < size - 3:
        tokens.append(b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))))
    tokens += [b"", tokens[7], b""]
    return Vocabulary(tuple(tokens), frozenset({size - 3}), None, size - 3, None, False)


def random_dfa(rng: random.Random, alphabet: bytes) -> tuple[ByteDfa, ByteDfa]:
    """A random DFA; about a third of its states only loop on ASCII bytes or die (the
    masks filter their subtrees instead of walking them: no byte group mixes both)."""
    n = rng.randint(3, 9)
    looping = {s for s in range(1, n) if rng.random() < 0.3}
    edges = {}
    for s in range(1, n):
        for b in alphabet:
            if rng.random() < 0.7 and (s not in looping or b < 0x80):
                edges[(s, b)] = s if s in looping else rng.randrange(n)
    accepting = {s for s in range(1, n) if rng.random() < 0.3}
    exits = {s for s in range(2, n) if rng.random() < 0.2}
    return make_dfa(n, edges, accepting, exits)


def test_masks_are_exact_against_brute_force():
    """For every state of random DFAs: allowed tokens == tokens after which some byte
    string reaches an accepting or exit state (BFS over the raw, untrimmed DFA)."""
    rng = random.Random(7)
    vocabulary = synthetic_vocabulary(rng)
    index = VocabularyIndex.build(vocabulary.token_bytes)
    alphabet = bytes(sorted(set(b"".join(vocabulary.token_bytes))))
    nontrivial = 0

    def patterns(byte_class):
        return ClassPatterns(index, byte_class, int(byte_class.max()) + 1)

    for _ in range(120):
        raw, trimmed = random_dfa(rng, alphabet)
        goals = set(np.flatnonzero(raw.accepting | raw.exits).tolist())
        live = coreachable(raw.transitions, goals) - {0}
        automaton = DfaTokenAutomaton(trimmed, index, vocabulary.token_bytes)
        for state in range(len(raw.transitions)):
            expected = []
            for token, data in enumerate(vocabulary.token_bytes):
                s = state
                for byte in data:
                    s = int(raw.transitions[s, byte])
                if data and state in live and s in live:
                    expected.append(token)
            engine_state = state if state in live else 0
            mask = automaton.mask(engine_state)
            assert mask.allowed.tolist() == expected, (state, raw.transitions)
            byte_class, classed = trimmed.byte_classes
            through_patterns = patterns(byte_class).final_states(classed, engine_state) != 0
            assert np.flatnonzero(through_patterns).tolist() == expected
            assert mask.count == len(expected)
            nontrivial += 0 < len(expected) < vocabulary.size - 3
            for token in expected:
                after = automaton.advance(engine_state, token)
                assert after in live
                assert automaton.accepts(after) == bool(raw.accepting[after])
    assert nontrivial > 100          # the random automata do exercise partial masks


def test_advance_stays_in_exit_and_dead_tokens_lead_to_dead():
    vocabulary = Vocabulary((b"ab.", b".xyz", b"a", b"q.", b"", b"zz"), frozenset({4}),
                            None, 4, None, False)
    index = VocabularyIndex.build(vocabulary.token_bytes)
    stops = DfaTokenAutomaton(stops_at("."), index, vocabulary.token_bytes)
    start = stops.initial()
    assert stops.mask(start).allowed.tolist() == [0, 1, 2, 3, 5]
    after = stops.advance(start, 1)
    assert stops.is_exit(after) and stops.advance(after, 5) == after
    assert not stops.is_exit(stops.advance(start, 2)) and stops.accepts(stops.advance(start, 2))
    letters = DfaTokenAutomaton(regex_dfa("[ab]+"), index, vocabulary.token_bytes)
    assert letters.mask(letters.initial()).allowed.tolist() == [2]
    assert letters.advance(letters.initial(), 3) == 0


def test_forced_bytes_follow_the_only_continuation():
    vocabulary = Vocabulary((b"a",), frozenset(), None, None, None, False)
    dfa = automaton.options([b"hello world", b"help"])
    words = DfaTokenAutomaton(dfa, VocabularyIndex.build(vocabulary.token_bytes),
                              vocabulary.token_bytes)
    assert words.forced(words.initial()) == b"hel"
    assert words.accepts(automaton.run(dfa, dfa.initial, b"help"))
    assert words.forced(automaton.run(dfa, dfa.initial, b"help")) == b""
    assert words.forced(automaton.run(dfa, dfa.initial, b"hell")) == b"o world"


@pytest.mark.parametrize("count", [0, 20, 600, 1000])      # empty; sparse; dense; everything
def test_a_mask_holds_exactly_its_tokens_in_either_form(count):
    rng = np.random.default_rng(count)
    size = 1000
    allowed = np.sort(rng.choice(size, count, replace=False)).astype(np.int32)
    flags = np.zeros(size, dtype=bool)
    flags[allowed] = True
    words = np.zeros((size + 31) // 32, dtype=np.int32)              # llguidance's form
    words.view(np.uint8)[:-(-size // 8)] = np.packbits(flags, bitorder="little")
    for mask in (TokenMask.of(allowed.copy(), size), TokenMask.of_flags(flags), TokenMask.of_bits(words, size)):
        assert mask.dense == (count > 20) and mask.count == count
        assert np.array_equal(mask.allowed, allowed) and np.array_equal(mask.flags, flags)
        assert np.array_equal(mask.bias, np.where(flags, 0.0, -np.inf).astype(np.float32))
        assert [t in mask for t in range(-1, size + 1)] == [False, *flags.tolist(), False]
    words[0] = 0                                 # of_bits copied the words it was given
    assert TokenMask.of_bits(words, size).count <= count == mask.count


@pytest.fixture(scope="module", params=VOCABULARIES, ids=os.path.basename)
def gguf_vocab(request):
    return load_vocab_only(request.param)


@pytest.fixture(scope="module")
def column_walk(gguf_vocab):
    return ColumnWalk(gguf_vocab.vocabulary().token_bytes)


def test_there_are_five_shared_vocabularies():
    assert len(VOCABULARIES) == 5


def test_gguf_token_bytes_are_real_bytes(gguf_vocab):
    """Byte-fallback, SentencePiece `▁` and GPT-2 `Ġ` pieces are decoded to bytes: every
    single byte has a token, end tokens are empty, and tokenized text joins back."""
    vocabulary = gguf_vocab.vocabulary()
    table = vocabulary.token_bytes
    assert {data[0] for data in table if len(data) == 1} == set(range(256))
    assert all(table[t] == b"" for t in vocabulary.end_ids)
    text = "héllo wörld\n\t€ 12"
    joined = b"".join(table[t] for t in gguf_vocab.tokenize(text))
    assert joined.lstrip(b" ") == text.encode()
    assert not any(b"\xe2\x96\x81" in table[t] for t in gguf_vocab.tokenize(text))   # no '▁'


def test_gguf_masks_equal_a_per_token_walk(gguf_vocab, column_walk, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vocabulary = gguf_vocab.vocabulary()
    index = vocabulary_index(vocabulary)
    table = vocabulary.token_bytes
    for dfa in (regex_dfa("[a-z ]+"), regex_dfa(INT_PATTERN), regex_dfa("[^a-zé]+"),
                automaton.options([b" yes", b" no", "é€".encode()]), stops_at("\n\n"),
                automaton.complement(automaton.contains(b"e"))):
        tokens = DfaTokenAutomaton(dfa, index, table)
        state = tokens.initial()
        for step in range(3):
            mask = tokens.mask(state)
            assert mask.allowed.tolist() == column_walk.mask(dfa, state)
            if not mask.count:
                break
            token = int(mask.allowed[(step + 1) * len(mask.allowed) // 4])
            after = tokens.advance(state, token)
            assert after == automaton.run(dfa, state, table[token]) != 0
            state = after


@pytest.mark.parametrize("pattern", ["[a-z ]+", "[0-9]+", "[ -~]*", "x[a-c]*y?", "(ab|[a-c ])+",
                                     "[^\\x00-\\x7f]+", "[é a-z]+", "( [a-z]+)*\\."])
def test_filtered_subtrees_give_the_per_token_walk_masks(gguf_vocab, column_walk, pattern):
    """States that only loop or die filter whole subtrees on their tokens' byte groups
    (exact only where no group holds both a looping and a dying byte); masks equal a
    per-token walk in every state along a few steps."""
    vocabulary = gguf_vocab.vocabulary()
    dfa = regex_dfa(pattern)
    tokens = DfaTokenAutomaton(dfa, vocabulary_index(vocabulary), vocabulary.token_bytes)
    state = tokens.initial()
    for step in range(4):
        mask = tokens.mask(state)
        assert mask.allowed.tolist() == column_walk.mask(dfa, state), (pattern, state)
        if not mask.count:
            break
        state = tokens.advance(state, int(mask.allowed[(step + 1) * len(mask.allowed) // 5]))


def test_a_loop_or_die_state_filters_instead_of_walking(gguf_vocab, monkeypatch):
    """`[a-z ]+` sets its subtrees aside for filtering after the first byte."""
    subtrees = []
    original = DfaTokenAutomaton._filtered_positions

    def spy(self, filtered, few):
        subtrees.append(len(few) + sum(len(starts) for starts, *_ in filtered))
        return original(self, filtered, few)

    monkeypatch.setattr(DfaTokenAutomaton, "_filtered_positions", spy)
    vocabulary = gguf_vocab.vocabulary()
    tokens = DfaTokenAutomaton(regex_dfa("[a-z ]+"), vocabulary_index(vocabulary), vocabulary.token_bytes)
    tokens.mask(tokens.initial())
    assert len(subtrees) == 1 and subtrees[0] >= 10    # most first bytes a-z and space


def test_many_dense_states_switch_to_class_patterns_with_equal_masks(gguf_vocab, column_walk):
    """`len(X) < 12` keeps almost every token alive in each of its states: after a couple
    of whole-trie walks the automaton uses the class-pattern trie; masks stay exact."""
    vocabulary = gguf_vocab.vocabulary()
    table = vocabulary.token_bytes
    dfa = automaton.char_count("<", 12)
    tokens = DfaTokenAutomaton(dfa, vocabulary_index(vocabulary), table)
    state = tokens.initial()
    for _ in range(6):
        assert tokens.mask(state).allowed.tolist() == column_walk.mask(dfa, state)
        state = automaton.run(dfa, state, "é".encode())
    assert tokens._patterns is not None


JSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["red", "blue", "é€"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"]}


def test_large_walks_of_many_class_dfas_run_in_the_kernel_with_equal_masks(gguf_vocab, column_walk,
                                                                         monkeypatch):
    """A JSON document's DFA (more byte classes than the class patterns take) keeps
    nearly every token alive inside a string: those walks go to the compiled kernel where
    it is built; its masks equal the per-token walk and numpy's walk."""
    from lmq.constraints.gbnf import parse_gbnf
    from lmq.constraints.gbnf_dfa import grammar_dfa
    from lmq.constraints.json_schema import json_constraint
    compiled = []
    original = DfaTokenAutomaton._compiled_allowed
    monkeypatch.setattr(DfaTokenAutomaton, "_compiled_allowed",
                        lambda self, walk, state: compiled.append(state) or original(self, walk, state))
    vocabulary = gguf_vocab.vocabulary()
    dfa = grammar_dfa(parse_gbnf(json_constraint(JSON_SCHEMA).gbnf))
    assert dfa.byte_classes[1].shape[1] > token_masks.PATTERN_CLASSES
    index = vocabulary_index(vocabulary)
    with_kernel = DfaTokenAutomaton(dfa, index, vocabulary.token_bytes)
    with_numpy = DfaTokenAutomaton(dfa, index, vocabulary.token_bytes)
    state = automaton.run(dfa, dfa.initial, b'{"name":"')
    for text in [b"", b"a", "é".encode()[:1], "é".encode()[1:], b"\\", b"bc", b'",', b'"age":1']:
        state = automaton.run(dfa, state, text)
        assert state != 0
        mask = with_kernel.mask(state)
        with token_choice.numpy_fallback():
            assert np.array_equal(with_numpy.mask(state).allowed, mask.allowed)
        assert mask.allowed.tolist() == column_walk.mask(dfa, state)
    assert bool(compiled) == (token_choice.KERNEL is not None)     # LMQ_NO_KERNEL=1: numpy walks


@pytest.mark.skipif(token_choice.KERNEL is None, reason="the compiled kernel is not built or not in use")
def test_the_kernels_trie_walk_refuses_inconsistent_arrays():
    index = VocabularyIndex.build((b"a", b"ab", b"b"))
    table = np.zeros((2, 256), np.int32)
    out = np.zeros(4, np.uint8)
    walk = token_choice.KERNEL.trie_walk
    with pytest.raises(ValueError):
        walk(table.ravel(), index.byte, index.child_start[:-1], index.lo, index.exact, 2, 1, out)
    with pytest.raises(ValueError):
        walk(table.ravel(), index.byte, index.child_start, index.lo, index.exact, 2, 5, out)
    with pytest.raises(TypeError):
        walk(table.ravel().astype(np.int64), index.byte, index.child_start, index.lo, index.exact, 2, 1, out)
    table[1, ord("a")] = 1
    walk(table.ravel(), index.byte, index.child_start, index.lo, index.exact,
         int(index.levels[1]), 1, out)
    assert out[:3].tolist() == [1, 0, 0]        # "a" alive, "ab" and "b" die


def test_dense_masks_kept_per_automaton_are_bounded(monkeypatch):
    """Old dense masks are dropped beyond `DENSE_MASKS_KEPT` and recomputed equal."""
    monkeypatch.setattr(token_masks, "DENSE_MASKS_KEPT", 3)
    vocabulary = synthetic_vocabulary(random.Random(2))
    dfa = automaton.char_count("<", 12)
    tokens = DfaTokenAutomaton(dfa, VocabularyIndex.build(vocabulary.token_bytes),
                               vocabulary.token_bytes)
    states, state = [], tokens.initial()
    for _ in range(6):
        states.append(state)
        state = automaton.run(dfa, state, b"a")
    first = [tokens.mask(s).allowed.tolist() for s in states]
    assert sum(mask.dense for mask in tokens._masks.values()) <= 3
    assert [tokens.mask(s).allowed.tolist() for s in states] == first


def test_vocabulary_index_cache_is_served_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vocabulary = load_vocab_only(VOCABULARIES[0]).vocabulary()
    built = vocabulary_index(vocabulary)
    files = glob.glob(str(tmp_path / "lmq" / "*"))
    assert len(files) == 1 and files[0].endswith(".npz")

    def no_build(token_bytes):
        raise AssertionError("the index was rebuilt instead of read from disk")

    copy = Vocabulary(tuple(vocabulary.token_bytes), vocabulary.end_ids, vocabulary.bos_id,
                      vocabulary.eos_id, vocabulary.eot_id, vocabulary.add_bos)
    with monkeypatch.context() as patch:
        patch.setattr(VocabularyIndex, "build", staticmethod(no_build))
        loaded = vocabulary_index(copy)
        assert vocabulary_index(copy) is loaded                 # shared in process
    assert loaded is not built
    for name, array in built.arrays().items():
        assert np.array_equal(array, loaded.arrays()[name]), name
    assert loaded.size == built.size


def test_one_cache_per_vocabulary_held_weakly_and_cleared_of_compiled_constraints(tmp_path, monkeypatch):
    """Every structure derived from a vocabulary lives in its one cache: an equal copy gets
    its own, a vocabulary that goes away takes its cache along (so a new one at the same
    address starts empty), and `clear_caches` forgets compiled automata but keeps the index."""
    import gc
    import weakref

    from lmq.backends.base import Vocabulary as _Vocabulary
    from lmq.constraints import vocabulary_cache as caches
    from lmq.constraints.hole_plan import HolePlan, build_automaton

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vocabulary = synthetic_vocabulary(random.Random(2))
    plan = HolePlan("X", language=("regex", "[ab]+"))
    build_automaton(plan, vocabulary)
    cache = caches.vocabulary_cache(vocabulary)
    assert cache.index is vocabulary_index(vocabulary) and len(cache.automata) == 1
    again = HolePlan("X", language=("regex", "[ab]+"))
    build_automaton(again, vocabulary)
    assert again.automaton is plan.automaton                   # served from the cache

    copy = _Vocabulary(tuple(vocabulary.token_bytes), vocabulary.end_ids, vocabulary.bos_id,
                       vocabulary.eos_id, vocabulary.eot_id, vocabulary.add_bos)
    assert copy == vocabulary and caches.vocabulary_cache(copy) is not cache

    caches.clear_caches()
    assert cache.automata == {} and cache.index is not None
    fresh = HolePlan("X", language=("regex", "[ab]+"))
    build_automaton(fresh, vocabulary)
    assert fresh.automaton is not plan.automaton

    gone = weakref.ref(cache)
    key = id(vocabulary)
    del vocabulary, plan, again, fresh, cache
    gc.collect()             # (may also collect other tests' vocabularies: the count is not checked)
    assert gone() is None and key not in caches._caches


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vocabulary = synthetic_vocabulary(random.Random(1))
    path = os.path.join(cache_directory(), vocabulary_key(vocabulary.token_bytes) + ".npz")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"PK not really a zip")
    index = vocabulary_index(vocabulary)
    assert np.array_equal(index.order, VocabularyIndex.build(vocabulary.token_bytes).order)
    with np.load(path) as stored:
        assert np.array_equal(stored["order"], index.order)


def test_concurrent_processes_share_one_cache_file(tmp_path):
    """Processes building the same index at once all end with equal arrays, and the
    cache directory holds one complete file (written to a temporary name, then renamed)."""
    script = (
        "import random, sys, numpy as np\n"
        "sys.path[:0] = sys.argv[1:]\n"
        "from test_token_masks import synthetic_vocabulary\n"
        "from lmq.constraints.vocabulary_index import vocabulary_index\n"
        "index = vocabulary_index(synthetic_vocabulary(random.Random(5), 3000))\n"
        "print(int(index.lo.sum()), int(index.order.sum()), index.node_count)\n")
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    workers = [subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__),
                                 os.path.dirname(os.path.dirname(__file__))],
                                env=environment, stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    outputs = {worker.communicate(timeout=120)[0] for worker in workers}
    assert all(worker.returncode == 0 for worker in workers)
    assert len(outputs) == 1
    assert [os.path.splitext(name)[1] for name in os.listdir(tmp_path / "lmq")] == [".npz"]
