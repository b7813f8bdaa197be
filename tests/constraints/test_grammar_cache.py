"""The grammar cache on disk (`lmq.constraints.grammar_cache`): a JSON schema's GBNF and
a grammar's llguidance form are read back instead of recomputed, give the same masks,
and a corrupt, foreign or stale file, a changed limit or concurrent writers never give
a wrong grammar."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmq.backends.gguf import load_vocab_only
from lmq.constraints import disk_cache, grammar_cache, json_schema, limits, llguidance_lark
from lmq.constraints.disk_cache import cache_directory
from lmq.constraints.grammar_automaton import GrammarTokenAutomaton
from lmq.constraints.json_schema import json_constraint
from lmq.constraints.vocabulary_cache import clear_caches
from lmq.errors import ConstraintTooLarge
from vocab_paths import vocab

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "tags": {"type": "array", "items": {"type": "integer"}}},
          "required": ["name", "tags"]}


@pytest.fixture(scope="module")
def vocabulary():
    return load_vocab_only(vocab("qwen2")).vocabulary()


def _first_mask(vocabulary) -> np.ndarray:
    automaton = GrammarTokenAutomaton(json_constraint(SCHEMA).gbnf, vocabulary, variable="X")
    return automaton.mask(automaton.initial()).allowed


def _entries() -> list[str]:
    disk_cache.flush()
    return sorted(os.listdir(os.path.join(cache_directory(), "grammars")))


def _refuse(*args, **kwargs):
    raise AssertionError("recomputed although cached on disk")


def test_a_compiled_schema_is_read_back_without_converting_or_translating(cache_home, vocabulary,
                                                                          monkeypatch):
    first = _first_mask(vocabulary)
    assert [name.split("-")[0] for name in _entries()] == ["json", "lark"]
    clear_caches()                              # a new process: only the disk is left
    monkeypatch.setattr(json_schema, "SchemaConverter", _refuse)
    monkeypatch.setattr(llguidance_lark, "choose_lexemes", _refuse)
    monkeypatch.setattr("lmq.constraints.grammar_automaton.parse_gbnf", _refuse)
    assert np.array_equal(_first_mask(vocabulary), first)


def test_corrupt_and_foreign_files_are_misses_and_rewritten(cache_home, vocabulary):
    first = _first_mask(vocabulary)
    paths = [os.path.join(cache_directory(), "grammars", name) for name in _entries()]
    with open(paths[0], "w") as f:
        f.write('{"key": "trunc')
    with open(paths[1], "w") as f:
        f.write('{"key": "another grammar", "value": "start: \\"x\\"\\n"}')
    clear_caches()
    assert np.array_equal(_first_mask(vocabulary), first)
    disk_cache.flush()
    for path in paths:                          # rewritten whole
        with open(path) as f:
            assert f.read().startswith('{"key": "lmq-grammars-')


def test_the_limits_are_part_of_the_key(cache_home, vocabulary, monkeypatch):
    """A grammar cached under generous limits is checked again under stricter ones."""
    _first_mask(vocabulary)
    clear_caches()
    monkeypatch.setattr(limits, "MAX_GRAMMAR_RULES", 3)
    with pytest.raises(ConstraintTooLarge):
        _first_mask(vocabulary)


def test_stored_text_is_what_was_computed(cache_home):
    """The entry holds the very value its build returned, under the whole key."""
    assert grammar_cache.cached("lark", "root ::= \"a\"\n", lambda: "start: \"a\"\n") == "start: \"a\"\n"
    assert grammar_cache.cached("lark", "root ::= \"a\"\n", _refuse) == "start: \"a\"\n"
    assert grammar_cache.cached("lark", "root ::= \"b\"\n", lambda: "other") == "other"


def test_concurrent_processes_share_the_entries(tmp_path):
    script = ("import sys\nfrom lmq.constraints.json_schema import json_constraint\n"
              "from lmq.constraints.grammar_automaton import lark_of\n"
              f"gbnf = json_constraint({SCHEMA!r}).gbnf\nprint(hash(lark_of(gbnf, 'X')), hash(gbnf))\n")
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONHASHSEED": "0"}
    workers = [subprocess.Popen([sys.executable, "-c", script], env=environment,
                                stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = {worker.communicate(timeout=120)[0] for worker in workers}
    assert all(worker.returncode == 0 for worker in workers)
    assert len(outputs) == 1
    names = os.listdir(tmp_path / "lmq" / "grammars")
    assert sorted(name.split("-")[0] for name in names) == ["json", "lark"]
