"""Bounded work per request in a real `lmq serve-model` subprocess: constraint programs
compile in child processes under the server's time and memory budgets, before the hole
takes a slot. The issue's reproducers answer a clear error on their own stream at once; a
client whose constraints run into the budgets leaves another client's requests at normal
latency and the server's memory bounded; a compile is abandoned when its stream is
cancelled or its client leaves; a repeated constraint is compiled once. (Fairness of the
batching loop across connections: test_serve_batching.py.)"""

import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed

from lmq.backends import default_model_path
from lmtp_harness import RawClient, ServerProcess
from subprocess_env import lmq_env

pytestmark = pytest.mark.model

MODEL = f"llama.cpp:{default_model_path()}"
PROMPT = [1, 504, 3287, 28, 827]
#: the issue's reproducers: (constraint program fields, what the error says)
REPRODUCERS = {
    "chars": ({"language": ["chars", "<", 100000]}, None),          # a budget, not states
    "dot star": ({"language": ["regex", ".*a.{40}"]}, "grows past 20,000 automaton states"),
    "absurd bound": ({"language": ["regex", "a{1000000000}"]}, "grows past 20,000"),
    "nested bounds": ({"language": ["regex", "(a{1000}){1000}"]}, "grows past 20,000"),
    "10,000 rules": ({"grammar": "root ::= r0\n" + "".join(
        f'r{i} ::= "a{i}" r{i + 1} | "b"\n' for i in range(10_000)) + 'r10000 ::= "z"\n'},
        "more than 1,000 rules"),
}
#: a regex whose DFA keeps growing (with the state limit raised: only the clock stops it)
ENDLESS = {"language": ["regex", ".*a.{40}"]}
#: a regex whose automaton eats memory fast (about 80 MB/s)
GREEDY = {"language": ["regex", "[a-z]{300000}"]}
#: latency bound for a small request while another client's constraints are being refused
NORMAL_SECONDS = 3.0


def program(**fields) -> dict:
    return {"grammar": None, "language": None, "min_tokens": 0, "max_tokens": 6, "stops": [],
            **fields}


def tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (Linux /proc)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status
                              if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def compile_children(pid: int) -> set[int]:
    """The server's compile processes."""
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            for child in children.read().split():
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                        if b"lmq.serve.compiling" in cmdline.read():
                            found.add(int(child))
                except FileNotFoundError:
                    pass
    return found


def model_info(client: RawClient) -> dict:
    client.send("MODEL_INFO", {"model": MODEL, "stream_id": 0})
    while True:
        kind, elements = client.frame()
        for element in elements:
            if "model_info" in element:
                return element["model_info"]


@contextlib.contextmanager
def serving(*flags: str):
    process = ServerProcess(MODEL, "--n_ctx", "1024", *flags)
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def server():
    with serving() as process:
        yield process


#: the engine's state limit lifted, so only the server's own budgets stop a compile
NO_STATE_LIMIT = ("--max-automaton-states", "1000000000")


@pytest.fixture(scope="module")
def strained_server():
    """Only the server's memory budget stops a compile."""
    budgets = ("--max-compile-seconds", "30", "--max-compile-memory", "100")
    with serving(*NO_STATE_LIMIT, *budgets) as process:
        yield process


@pytest.fixture(scope="module")
def timed_server():
    """Only the server's clock stops a compile."""
    with serving(*NO_STATE_LIMIT, "--max-compile-seconds", "0.5") as process:
        yield process


@pytest.fixture(scope="module")
def patient_server():
    """A long compile budget: a compile ends only when its stream goes."""
    with serving(*NO_STATE_LIMIT, "--max-compile-seconds", "300") as process:
        yield process


def test_reproducers_answer_on_their_own_stream(server):
    """Each of the issue's reproducers is a clear error on its stream (or a quick result),
    and the connection goes on serving."""
    client = RawClient(server.url)
    try:
        for stream_id, (name, (fields, says)) in enumerate(REPRODUCERS.items(), 1):
            started = time.monotonic()
            elements = client.generate(MODEL, PROMPT, stream_id=stream_id, max_tokens=6,
                                       constraint=program(**fields))
            assert time.monotonic() - started < 30, name
            last = elements[-1]
            if says is None:
                assert "error" not in last and last["finish_reason"] in ("stop", "length"), name
            else:
                assert last["error_type"] == "ConstraintTooLarge", (name, last)
                assert says in last["error"] and "--max-" in last["error"], (name, last)
        elements = client.generate(MODEL, PROMPT, stream_id=99, max_tokens=3)
        assert [e.get("error") for e in elements] == [None] * 3
    finally:
        client.close()


def test_a_repeated_constraint_is_compiled_once(server):
    """The second request with the same program (an error or an automaton) is answered from
    the server's cache: the compile count does not grow."""
    client = RawClient(server.url)
    try:
        digits = program(language=["regex", "[0-9]{2,5}"])
        first = client.generate(MODEL, PROMPT, stream_id=1, max_tokens=6, constraint=digits)
        too_large = program(language=["regex", "(b|c)*b(b|c){20}"])
        refused = client.generate(MODEL, PROMPT, stream_id=2, max_tokens=6, constraint=too_large)
        before = model_info(client)
        again = client.generate(MODEL, PROMPT, stream_id=3, max_tokens=6, constraint=digits)
        refused_again = client.generate(MODEL, PROMPT, stream_id=4, max_tokens=6,
                                        constraint=too_large)
        after = model_info(client)
        assert [e["token"] for e in again] == [e["token"] for e in first]
        assert refused_again[-1]["error"] == refused[-1]["error"]
        assert after["constraint_compiles"] == before["constraint_compiles"]
        assert after["constraint_cache_hits"] == before["constraint_cache_hits"] + 2
    finally:
        client.close()


def test_costly_constraints_leave_others_at_normal_latency_and_memory_bounded(strained_server):
    """One client sends constraints that only the memory budget stops, several at once;
    while they compile, another client's small requests (unconstrained, and with a fresh
    constraint each) keep their usual latency, and the server with its compile processes
    stays within its budgets."""
    pid = strained_server.process.pid
    baseline = tree_rss(pid)
    costly = RawClient(strained_server.url)
    other = RawClient(strained_server.url)
    peak, latencies, answers, done = [baseline], [], {}, threading.Event()
    expensive = [program(**GREEDY), program(language=["regex", "[a-y]{300000}"]),
                 program(language=["regex", "[b-z]{300000}"])]

    def watch() -> None:
        while not done.is_set():
            peak.append(tree_rss(pid))
            time.sleep(0.1)

    def refused() -> None:
        for stream_id, constraint in enumerate(expensive, 1):
            costly.send("GENERATE", {"model": MODEL, "prompt": PROMPT, "stream_id": stream_id,
                                     "max_tokens": 6, "constraint": constraint})
        while len(answers) < len(expensive):
            for element in costly.frame(timeout=60)[1]:
                answers[element["stream_id"]] = element

    watcher, sender = threading.Thread(target=watch), threading.Thread(target=refused)
    watcher.start()
    started = time.monotonic()
    sender.start()
    try:
        while sender.is_alive() or len(latencies) < 12:
            i = len(latencies)
            began = time.monotonic()
            if i % 2:
                digits = program(language=["regex", f"[0-9]{{1,{i + 2}}}"])
                elements = other.generate(MODEL, PROMPT, stream_id=i, max_tokens=6,
                                          constraint=digits)
            else:
                elements = other.generate(MODEL, PROMPT, stream_id=i, max_tokens=8)
            latencies.append(time.monotonic() - began)
            assert "error" not in elements[-1], elements[-1]
            assert time.monotonic() - started < 120
    finally:
        sender.join(120)
        done.set()
        watcher.join()
        costly.close()
        other.close()
    errors = [answers[i]["error"] for i in range(1, len(expensive) + 1)]
    assert all(answers[i]["error_type"] == "ConstraintTooLarge" for i in answers), errors
    assert all("more than the server's limit of 100 MiB (--max-compile-memory)" in error
               for error in errors), errors
    assert max(latencies) < NORMAL_SECONDS, latencies
    assert max(peak) - baseline < 1.5 * 2 ** 30, (max(peak) - baseline) / 2 ** 20


def test_a_compile_past_the_time_budget_is_stopped(timed_server):
    """A compile longer than --max-compile-seconds (a regex that never ends, a grammar of
    990 rules) answers a clear error on its stream soon after the budget; the next
    constraint compiles in a fresh process."""
    client = RawClient(timed_server.url)
    chain = "root ::= r0\n" + "".join(f'r{i} ::= "a{i}" r{i + 1} | "b"\n' for i in range(990)) \
        + 'r990 ::= "z"\n'
    try:
        for stream_id, fields in enumerate([ENDLESS, {"grammar": chain}], 1):
            started = time.monotonic()
            [element] = client.generate(MODEL, PROMPT, stream_id=stream_id, max_tokens=6,
                                        constraint=program(**fields))
            assert time.monotonic() - started < 10
            assert element["error_type"] == "ConstraintTooLarge"
            assert ("longer than the server's limit of 0.5 s (--max-compile-seconds)"
                    in element["error"])
        elements = client.generate(MODEL, PROMPT, stream_id=3, max_tokens=6,
                                   constraint=program(language=["regex", "[a-c]+"]))
        assert "error" not in elements[-1]
    finally:
        client.close()


def test_a_compile_is_abandoned_when_its_stream_is_cancelled_or_its_client_leaves(patient_server):
    """A compile that would run for minutes stops with its stream: CANCEL answers
    "cancelled" and kills the compiling process; so does closing the connection."""
    pid = patient_server.process.pid
    children = compile_children(pid)
    client = RawClient(patient_server.url)
    try:
        client.send("GENERATE", {"model": MODEL, "prompt": PROMPT, "stream_id": 1,
                                 "max_tokens": 6, "constraint": program(**ENDLESS)})
        time.sleep(1.0)                             # it is compiling now
        client.send("CANCEL", {"stream_id": 1})
        [element] = client.stream(1, timeout=10)
        assert element["finish_reason"] == "cancelled"
        _wait_for_replaced(pid, children)
        children = compile_children(pid)
        client.send("GENERATE", {"model": MODEL, "prompt": PROMPT, "stream_id": 2,
                                 "max_tokens": 6, "constraint": program(**ENDLESS)})
        time.sleep(1.0)
    finally:
        client.close()
    _wait_for_replaced(pid, children)
    other = RawClient(patient_server.url)
    try:
        elements = other.generate(MODEL, PROMPT, max_tokens=6,
                                  constraint=program(language=["regex", "[a-c]+"]))
        assert "error" not in elements[-1]
    finally:
        other.close()


def _wait_for_replaced(pid: int, children: set[int]) -> None:
    """Wait until one of the server's compile processes `children` is gone."""
    deadline = time.monotonic() + 10
    while children <= compile_children(pid):
        assert time.monotonic() < deadline, "the compile was not abandoned"
        time.sleep(0.1)


def test_shutdown_while_compiling_answers_every_hole():
    """SIGTERM while holes compile, wait for their turn, or their lane starts a fresh
    process after a compile past its budget: every hole gets one answer on its stream,
    the server exits 0 and logs no traceback."""
    with serving(*NO_STATE_LIMIT, "--max-compile-seconds", "0.5") as process:
        client = RawClient(process.url)
        try:
            for stream_id, letter in enumerate("abc", 1):
                endless = program(language=["regex", f".*{letter}.{{40}}"])
                client.send("GENERATE", {"model": MODEL, "prompt": PROMPT, "stream_id": stream_id,
                                         "max_tokens": 6, "constraint": endless})
            time.sleep(0.8)                     # the first compile is past its budget by now
            assert process.terminate() == 0
            answers = []
            with contextlib.suppress(ConnectionClosed):      # the server closes after answering
                while True:
                    answers.extend(client.frame(timeout=10)[1])
        finally:
            client.close()
        assert sorted(a["stream_id"] for a in answers) == [1, 2, 3], answers
        assert all(a["error"] == "the server is shutting down" or "0.5 s" in a["error"]
                   for a in answers), answers
        assert "Traceback" not in "".join(process.log), "".join(process.log)


EMBEDDED = """
from lmq.backends import default_model_path
from lmq.backends.gguf import load_vocab_only
from lmq.serve.compiling import CompileLimits, ConstraintCompiler
from lmq.serve.holes import HoleStream

compiler = ConstraintCompiler(load_vocab_only(default_model_path()).vocabulary(),
                              CompileLimits(workers=1))
compiler.wait_started()
lane = compiler._lanes[0]
print(type(lane._compile({"language": ["regex", "[0-9]+"]}).automaton).__name__)
compiler.stop()
"""


def test_compiles_where_the_servers_main_module_cannot_be_imported_again():
    """A server embedded in a program read from stdin (or a notebook) still compiles: the
    compile processes never import the server's `__main__`."""
    done = subprocess.run([sys.executable, "-"], input=EMBEDDED, capture_output=True, text=True,
                          timeout=120, env=lmq_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["DfaTokenAutomaton"], done.stdout
