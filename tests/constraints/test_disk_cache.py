"""Entries written behind the compile (`lmq.constraints.disk_cache.write_behind`): off
the caller's path, readable from memory until written, all on disk by `flush`, at exit
and never lost or doubled across a fork."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from typing import Callable

from lmq.constraints import disk_cache
from lmq.constraints.gbnf_dfa import cached_grammar_dfa
from lmq.constraints.json_schema import json_constraint


def _gate() -> tuple[threading.Event, Callable[[], bytes]]:
    opened = threading.Event()

    def contents() -> bytes:
        if not opened.wait(30):
            raise TimeoutError("the test never opened the gate")
        return b"first"
    return opened, contents


def test_a_pending_entry_is_read_from_memory_then_found_on_disk(tmp_path):
    opened, held = _gate()
    first, second = str(tmp_path / "a" / "first"), str(tmp_path / "a" / "second")
    disk_cache.write_behind(first, held)             # the writer waits on this one
    disk_cache.write_behind(second, lambda: b"second")
    assert disk_cache.read(second) == b"second"
    assert not os.path.exists(second)
    opened.set()
    disk_cache.flush()
    assert [disk_cache.read(path) for path in (first, second)] == [b"first", b"second"]
    with open(second, "rb") as f:
        assert f.read() == b"second"


def test_a_compile_does_not_wait_for_its_entries(cache_home, monkeypatch):
    """The JSON schema's GBNF and DFA entries are queued, not written, when the compile
    returns (the writer is held here), and a read of them meanwhile needs no build."""
    opened = threading.Event()
    write = disk_cache.write_atomically
    monkeypatch.setattr(disk_cache, "write_atomically",
                        lambda path, contents: (opened.wait(30), write(path, contents)))
    gbnf = json_constraint({"type": "object", "properties": {"n": {"type": "integer"}}}).gbnf
    dfa = cached_grammar_dfa(gbnf, "JSON")
    directory = cache_home / "lmq" / "grammars"
    assert not directory.exists() or not os.listdir(directory)
    cached_grammar_dfa.cache_clear()
    monkeypatch.setattr("lmq.constraints.gbnf_dfa._text_built", _refuse)
    assert cached_grammar_dfa(gbnf, "JSON").accepting.tolist() == dfa.accepting.tolist()
    opened.set()
    disk_cache.flush()
    assert sorted(name.split("-")[0] for name in os.listdir(directory)) == ["dfa6000", "json"]


def _refuse(*args):
    raise AssertionError("built again although its entry was pending")


def test_an_entry_that_cannot_be_encoded_is_told_and_the_rest_written(tmp_path):
    def broken() -> bytes:
        raise ValueError("no encoding")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        disk_cache.write_behind(str(tmp_path / "broken"), broken)
        disk_cache.write_behind(str(tmp_path / "kept"), lambda: b"kept")
        disk_cache.flush()
    assert [str(w.message) for w in caught if "broken" in str(w.message)] \
        == [f"lmq did not cache {tmp_path / 'broken'}: ValueError('no encoding')"]
    assert os.listdir(tmp_path) == ["kept"]


def test_where_no_thread_can_start_the_entry_is_written_in_line(tmp_path, monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(disk_cache, "_worker", None)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    disk_cache.write_behind(str(tmp_path / "entry"), lambda: b"in line")
    assert (tmp_path / "entry").read_bytes() == b"in line"


SLOW_EXIT = """
import sys, time
from lmq.constraints import disk_cache
disk_cache.write_behind(sys.argv[1], lambda: (time.sleep(0.5), b"written")[1])
"""

FORK = """
import os, sys, threading
from lmq.constraints import disk_cache
opened = threading.Event()
disk_cache.write_behind(sys.argv[1] + "/parent", lambda: (opened.wait(30), b"parent")[1])
child = os.fork()
if child == 0:
    disk_cache.flush()                      # the parent's entry is not the child's to wait for
    disk_cache.write_behind(sys.argv[1] + "/child", lambda: b"child")
    disk_cache.flush()
    os._exit(0)
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status), sorted(os.listdir(sys.argv[1])))
opened.set()
"""


def _python(script: str, *arguments: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_process_writes_its_entries_before_it_exits(tmp_path):
    _python(SLOW_EXIT, str(tmp_path / "entry"))
    assert (tmp_path / "entry").read_bytes() == b"written"


def test_a_forked_child_writes_its_own_entries_and_leaves_the_parents(tmp_path):
    assert _python(FORK, str(tmp_path)) == "0 ['child']\n"
    assert sorted(os.listdir(tmp_path)) == ["child", "parent"]
    assert (tmp_path / "parent").read_bytes() == b"parent"
