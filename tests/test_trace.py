"""Traces (`trace=`, `lmq run --trace`, `lmq trace show`) on SmolLM2 through llama.cpp.

Every check recomputes what the trace claims from another source: token ids and values
from the results, `allowed` from the hole's own automaton walked along the traced tokens,
the model's log-probabilities from `model.score` (a separate batched evaluation, so equal
to llama.cpp's rounding of differently shaped batches: a few hundredths of a nat)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmq
from lmq.backends import default_model_path
from lmq.compiler.codegen import compile_query
from lmq.runtime.hole import plan_hole
from lmtp_harness import ServerProcess

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Q: Name a fruit.\nA:"
OPTIONS = [" apple pie with cream", " banana", " cherry", " grape"]
CHOICE = f'"{PROMPT.replace(chr(10), "[NL]")}[X]" where X in {OPTIONS!r}'.replace("[NL]", "\\n")
EVENTS = {"query", "text", "hole", "token", "value", "result"}


@pytest.fixture(scope="module")
def model():
    return lmq.model(None, flash_attn=False)


def events_of(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def tokens_of(events, branch=0, variable="X"):
    return [e for e in events if e["event"] == "token" and e["branch"] == branch
            and e["variable"] == variable]


def expected_allowed(model, query_text, variable, token_ids, scope=None):
    """Per traced token: the count of the hole's mask in the state the traced tokens lead
    to, plus the end tokens where the value may end there (the decoder adds them)."""
    backend = model.backend()
    spec = next(h for h in compile_query(query_text).holes if h.name == variable)
    plan = plan_hole(variable, spec.where, dict(scope or {}), backend.vocabulary)
    automaton = plan.automaton
    state = automaton.initial()
    counts = []
    for token in token_ids:
        ends = len(backend.vocabulary.end_ids) if automaton.accepts(state) else 0
        counts.append(automaton.mask(state).count + ends)
        if token not in backend.vocabulary.end_ids:
            state = automaton.advance(state, token)
    return counts


def check_token_events(model, tokens, result, query_text, variable="X"):
    """What every token event of one branch's hole must say."""
    backend = model.backend()
    vocabulary = backend.vocabulary
    ids = [t["id"] for t in tokens]
    generated = result.tokens[variable]
    assert ids[:len(generated)] == generated
    assert ids[len(generated):] in ([], [ids[-1]]) and set(ids[len(generated):]) <= vocabulary.end_ids
    assert sum(t["logprob"] for t in tokens) == pytest.approx(result.logprob, abs=1e-4)
    assert [t["allowed"] for t in tokens] == expected_allowed(model, query_text, variable, ids)
    for token in tokens:
        assert token["vocabulary"] == vocabulary.size
        data = vocabulary.token_bytes[token["id"]]
        assert token["text"] == (data.decode("utf-8", "backslashreplace") if data
                                 else backend.token_text(token["id"]))
        if token["forced"] and token["top"] is None:            # fast-forward: not scored
            assert token["logprob"] == 0.0 and token["masked_top"] is None
            continue
        assert token["forced"] == (token["allowed"] == 1)
        top, masked = token["top"], token["masked_top"]
        assert len(top) == 5 and len(masked) == min(5, token["allowed"])
        assert [p[2] for p in top] == sorted((p[2] for p in top), reverse=True)
        assert [p[2] for p in masked] == sorted((p[2] for p in masked), reverse=True)
        # the model's top tokens are its best over the whole vocabulary: the chosen token,
        # when it is not among them, is less likely than all of them
        if token["id"] not in [p[0] for p in top]:
            assert token["model_logprob"] <= top[-1][2]
        # the masked distribution: the chosen token is in it, with the token's logprob,
        # and its probabilities over the allowed tokens sum to at most 1
        assert np.exp([p[2] for p in masked]).sum() <= 1 + 1e-5
        assert token["logprob"] <= 1e-6 and token["model_logprob"] <= token["logprob"] + 1e-5
        for token_id, text, _ in top + masked:
            data = vocabulary.token_bytes[token_id]
            assert text == (data.decode("utf-8", "backslashreplace") if data
                            else backend.token_text(token_id))


def test_argmax_trace_has_every_event_with_the_run_values(model, tmp_path):
    path = tmp_path / "t.jsonl"
    result = lmq.run_sync(CHOICE, model=model, trace=str(path))
    events = events_of(path)
    assert {e["event"] for e in events} == EVENTS
    assert events[0]["event"] == "query" and events[-1]["event"] == "result"
    query = events[0]
    assert query["source"].strip() == CHOICE and query["decoder"] == "argmax"
    assert query["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and query["lmq"] == lmq.__version__
    assert [e["text"] for e in events if e["event"] == "text"] == [PROMPT]
    hole = next(e for e in events if e["event"] == "hole")
    assert hole["variable"] == "X" and hole["constraint"] == f"X in {OPTIONS!r}"
    assert hole["budget"] is None and hole["stops"] == []
    assert "banana" in hole["gbnf"] and "root ::=" in hole["gbnf"]
    tokens = tokens_of(events)
    check_token_events(model, tokens, result, CHOICE)
    chosen = [t for t in tokens if t["top"] is not None]
    for token in chosen:                    # argmax: the best allowed token
        assert token["masked_top"][0][0] == token["id"]
        assert token["masked_top"][0][2] == pytest.approx(token["logprob"], abs=1e-5)
    # the model's own log-probabilities, recomputed by scoring the generated tokens (up
    # to the first fast-forward: a row after a batch of several tokens differs from one
    # decoded token by token by up to 0.2 nats in llama.cpp's quantized kernels)
    scored = model.score_sync(PROMPT, [result.tokens["X"]]).token_logprobs[0]
    stepwise = tokens[:next((i for i, t in enumerate(tokens) if t["top"] is None), len(tokens))]
    assert len(stepwise) >= 2
    for token, expected in zip(stepwise, scored):
        assert token["model_logprob"] == pytest.approx(float(expected), abs=0.05)
    value = next(e for e in events if e["event"] == "value")
    assert value == {"event": "value", "branch": 0, "variable": "X", "value": result.variables["X"],
                     "finish": "end"}
    assert events[-1] == {"event": "result", "depth": 0, **result.to_json()}


def test_fast_forwarded_tokens_are_marked_forced(model, tmp_path):
    path = tmp_path / "t.jsonl"
    query = CHOICE.replace(repr(OPTIONS), repr([" apple pie with cream and sugar"]))
    result = lmq.run_sync(query, model=model, trace=str(path))
    tokens = tokens_of(events_of(path))
    check_token_events(model, tokens, result, query)
    # one option: its text is forced (fast-forward, not scored) but for the last token,
    # which the mask leaves as the only choice
    fast = [t for t in tokens if t["top"] is None]
    assert fast and all(t["forced"] and t["logprob"] == 0.0 for t in fast)
    assert all(t["forced"] for t in tokens if t["allowed"] == 1)
    assert "".join(t["text"] for t in tokens if t["id"] not in model.backend().vocabulary.end_ids) \
        == result.variables["X"] == " apple pie with cream and sugar"


def test_sample_two_branches_each_traced(model, tmp_path):
    path = tmp_path / "t.jsonl"
    results = lmq.run_sync(CHOICE, model=model, trace=str(path), decoder="sample(n=2, seed=3)")
    events = events_of(path)
    assert {e["event"] for e in events} == EVENTS
    assert events[0]["decoder"] == "sample" and events[0]["settings"] == {"n": 2, "seed": 3}
    for branch, result in enumerate(results):
        mine = [e for e in events if e.get("branch") == branch]
        assert [e["event"] for e in mine if e["event"] != "token"] == ["text", "hole", "value"]
        assert next(e for e in mine if e["event"] == "value")["value"] == result.variables["X"]
        check_token_events(model, tokens_of(events, branch), result, CHOICE)
    assert events[-1]["results"] == [r.to_json() for r in results]


@lmq.query
def fruit(kind):
    '''lmq
    "A {kind} fruit:[F]" where F in [" apple", " pear", " plum"]
    return F.strip().upper()
    '''


def test_nested_query_events_are_nested(model, tmp_path):
    path = tmp_path / "t.jsonl"
    query = '"Pick. [X: fruit(\'red\')] Then:[Y]" where len(TOKENS(Y)) < 3'
    result = lmq.run_sync(query, model=model, trace=str(path))
    events = events_of(path)
    assert {e["event"] for e in events} == EVENTS
    kinds = [(e["event"], e.get("depth"), e.get("variable")) for e in events if e["event"] != "token"]
    kinds = [k for i, k in enumerate(kinds) if k[0] != "text" or kinds[i - 1][0] != "text"]
    assert kinds == [("query", 0, None), ("text", None, None), ("query", 1, None),
                     ("text", None, None), ("hole", None, "F"), ("value", None, "F"),
                     ("result", 1, None), ("text", None, None), ("value", None, "X"), ("text", None, None),
                     ("hole", None, "Y"), ("value", None, "Y"), ("result", 0, None)]
    inner = next(e for e in events if e["event"] == "query" and e["depth"] == 1)
    assert inner["name"] == "fruit" and "A {kind} fruit:[F]" in inner["source"]
    texts = "".join(e["text"] for e in events if e["event"] == "text")
    assert texts == f"Pick. A red fruit:{result.variables['X']} Then:"
    returned = next(e for e in events if e["event"] == "result" and e["depth"] == 1)
    assert returned["return"] == result.variables["X"] and returned["return"] in ("APPLE", "PEAR", "PLUM")
    assert next(e for e in events if e["event"] == "value" and e["variable"] == "X")["finish"] == "query"
    ends = model.backend().vocabulary.end_ids
    inner = "".join(t["text"] for t in tokens_of(events, variable="F") if t["id"] not in ends)
    assert inner.strip().upper() == result.variables["X"]
    assert [t["id"] for t in tokens_of(events, variable="Y")] == result.tokens["Y"]


@pytest.mark.parametrize("decoder", ["beam(n=3)", "best_k(k=2)"])
def test_search_branches_are_linked_to_their_parents(model, tmp_path, decoder):
    path = tmp_path / "t.jsonl"
    query = f'"{PROMPT.replace(chr(10), "[NL]")}[X]" where len(TOKENS(X)) < 4'.replace("[NL]", "\\n")
    results = lmq.run_sync(query, model=model, trace=str(path), decoder=decoder)
    events = events_of(path)
    splits = {e["branch"]: e for e in events if e["event"] == "branch"}
    assert splits and all(s["variable"] == "X" and s["parent"] < b for b, s in splits.items())

    def tokens_of_branch(branch):
        own = [t["id"] for t in tokens_of(events, branch)]
        if branch not in splits:
            return own
        return tokens_of_branch(splits[branch]["parent"])[:splits[branch]["tokens"]] + own

    finished = {e["branch"] for e in events if e["event"] == "value"}
    assert {e["branch"] for e in events if e["event"] == "pruned"}.isdisjoint(finished)
    traced = [tokens_of_branch(b) for b in finished]
    for result in results:
        assert result.tokens["X"] in [t[:len(result.tokens["X"])] for t in traced]
    for branch in splits:          # a split branch's first token was scored by its parent's step
        first = tokens_of(events, branch)[0]
        assert first["top"] is not None and first["id"] in [p[0] for p in first["masked_top"]]


def test_events_are_written_while_the_query_runs(model, tmp_path):
    path = tmp_path / "t.jsonl"

    def seen():
        return [e["event"] for e in events_of(path)]

    query = f'{CHOICE}\nbefore = seen()\n"[Y]" where len(TOKENS(Y)) < 2\nreturn before'
    before = lmq.run_sync(query, model=model, trace=str(path), seen=seen)
    assert before[-1] == "value" and "token" in before and "result" not in before
    assert seen()[-1] == "result"


def test_errors_end_the_trace(model, tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(ZeroDivisionError):
        lmq.run_sync(f'{CHOICE}\nx = 1 / 0', model=model, trace=str(path))
    error = events_of(path)[-1]
    assert error["event"] == "error" and error["type"] == "ZeroDivisionError" and error["line"] == 2
    with pytest.raises(lmq.LmqSyntaxError):
        lmq.run_sync('"fine"\n"broken [1x]"', trace=str(path))
    error = events_of(path)[-1]
    assert error["type"] == "LmqSyntaxError" and error["line"] == 2 and error["column"] > 0
    with pytest.raises(lmq.QueryArgumentError, match="cannot write the trace to"):
        lmq.run_sync(CHOICE, model=model, trace=str(tmp_path / "no" / "such" / "dir.jsonl"))
    with pytest.raises(lmq.QueryArgumentError, match="trace must be a file path"):
        lmq.run_sync(CHOICE, model=model, trace=3)


def test_trace_reaches_every_way_of_calling_a_query(model, tmp_path):
    collected = []
    F = lmq.F("Name a fruit:[X]", "X in [' apple', ' pear']", model=model, trace=collected.append)
    assert F() in (" apple", " pear")
    assert collected[0]["event"] == "query" and collected[-1]["event"] == "result"
    decorated = lmq.query(CHOICE, model=model, trace=str(tmp_path / "d.jsonl"))
    decorated()
    assert events_of(tmp_path / "d.jsonl")[-1]["event"] == "result"
    with open(tmp_path / "f.jsonl", "w", encoding="utf-8") as stream:    # an open file: both calls
        fruit("red", model=model, trace=stream)
        fruit("green", model=model, trace=stream)
    assert [e["event"] for e in events_of(tmp_path / "f.jsonl")].count("query") == 2
    generated = []
    assert model.generate_sync("Fruit:", max_tokens=2, trace=generated.append)
    assert [e["event"] for e in generated if e["event"] != "token"] == ["query", "text", "hole", "value",
                                                                       "result"]
    assert len([e for e in generated if e["event"] == "token"]) >= 1


def lmq_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmq.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_run_trace_and_show(tmp_path):
    query = tmp_path / "q.lmq"
    query.write_text(CHOICE + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    done = lmq_cli("run", str(query), "--trace", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    events = events_of(out)
    assert events[-1] == {"event": "result", "depth": 0, **result}
    tokens = tokens_of(events)
    shown = lmq_cli("trace", "show", str(out), "--top", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.split()[:2] == ["br", "var"] for line in lines)
    rows = [line.split() for line in lines if line.split()[:2] == ["0", "X"]]
    assert [int(r[3]) for r in rows] == [t["id"] for t in tokens]
    assert [r[2] for r in rows] == [str(i) for i in range(len(tokens))]
    assert any(f"{t['allowed']}/{t['vocabulary']}" in line for t in tokens for line in lines)
    assert any(line.startswith("[0] X = ") for line in lines)


def test_cli_trace_errors(tmp_path):
    broken = tmp_path / "broken.lmq"
    broken.write_text('"fine"\n"broken [1x]"\n')
    out = tmp_path / "out.jsonl"
    done = lmq_cli("run", str(broken), "--trace", str(out))
    assert done.returncode == 1
    assert events_of(out) == [{"event": "error", "type": "LmqSyntaxError", "line": 2,
                               "column": events_of(out)[0]["column"],
                               "message": events_of(out)[0]["message"]}]
    shown = lmq_cli("trace", "show", str(out))
    assert shown.returncode == 0 and "error (line 2): LmqSyntaxError" in shown.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "text", "text": "a"}\nnot json\n')
    shown = lmq_cli("trace", "show", str(bad))
    assert shown.returncode == 1 and "bad.jsonl, line 2: not JSON" in shown.stderr
    assert "Traceback" not in shown.stderr
    shown = lmq_cli("trace", "show", str(tmp_path / "missing.jsonl"))
    assert shown.returncode == 2 and "trace file not found" in shown.stderr


def model_size():
    return lmq.model(None).backend().vocabulary.size


def test_lmtp_trace_has_what_the_server_says(tmp_path):
    server = ServerProcess(f"llama.cpp:{default_model_path()}", "--n_ctx", "1024", "--slots", "2")
    try:
        remote = lmq.model(f"llama.cpp:{default_model_path()}", endpoint=server.url.removeprefix("ws://").rstrip("/"))
        path = tmp_path / "t.jsonl"
        result = lmq.run_sync(CHOICE, model=remote, trace=str(path))
    finally:
        server.kill()
    events = events_of(path)
    assert {e["event"] for e in events} == EVENTS
    tokens = tokens_of(events)
    ids = [t["id"] for t in tokens]
    assert ids[:len(result.tokens["X"])] == result.tokens["X"]
    assert sum(t["logprob"] for t in tokens) == pytest.approx(result.logprob, abs=1e-4)
    assert all(t["allowed"] is None and t["top"] is None and t["model_logprob"] is None for t in tokens)
    assert [t["forced"] for t in tokens] == [t["logprob"] == 0.0 for t in tokens]
    local_path = tmp_path / "local.jsonl"        # in process, with the server's model settings
    lmq.run_sync(CHOICE, model=lmq.model(None), trace=str(local_path))
    local = tokens_of(events_of(local_path))
    assert ids == [t["id"] for t in local]
    assert [t["forced"] for t in tokens] == [t["forced"] for t in local]
    table = subprocess.run([sys.executable, "-m", "lmq.cli", "trace", "show", str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60).stdout
    assert f"-/{model_size()}" in table and "-/-" not in table
