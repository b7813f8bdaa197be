"""`lmq serve-model` as a real subprocess on 127.0.0.1, spoken to with raw LMTP frames the
way an LMQL 0.7 client speaks: answers are checked against the same model in process."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from lmq.backends import default_model_path, load_backend
from lmtp_harness import RawClient, ServerProcess

pytestmark = pytest.mark.model

MODEL = "llama.cpp:" + default_model_path()


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(MODEL, "--n_ctx", "1024", "--slots", "4", "--max-frame-bytes", "65536",
                            "--max-streams", "4", "--static")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def local():
    # the server's configuration, in an instance of its own (other tests' cache history
    # shifts llama.cpp's logits in the last digits)
    return load_backend(None, n_ctx=1024, n_batch=512)


@pytest.fixture
def client(server):
    connection = RawClient(server.url)
    yield connection
    connection.close()


def prompt_of(local, text):
    return local.tokenize(text)


def greedy(local, prompt, n, bias=None):
    """What argmax decoding gives in process: n tokens and each one's log-probability."""
    sequence = local.sequence()
    try:
        row = sequence.logits(prompt)
        out = []
        for _ in range(n):
            scores = row + bias if bias is not None else row
            token = int(scores.argmax())
            out.append((token, float(scores[token] - np.logaddexp.reduce(scores.astype(np.float64)))))
            row = sequence.advance(token)
        return out
    finally:
        sequence.release()


def test_model_info_describes_the_model(client, local):
    client.send("MODEL_INFO", {"model": MODEL, "stream_id": 7, "data": {}})
    kind, [element] = client.frame()
    info = element["model_info"]
    assert kind == "MSG" and element["stream_id"] == 7
    assert info["vocab_size"] == local.vocabulary.size
    assert info["eos_token_id"] == local.vocabulary.eos_id
    assert set(info["end_token_ids"]) == set(local.vocabulary.end_ids)
    assert info["context_size"] == 1024 and info["slots"] == 4
    assert info["tokenizer_gguf"] == default_model_path()


def test_generate_streams_the_in_process_argmax_tokens(client, local):
    prompt = prompt_of(local, "The capital of France is")
    elements = client.generate(MODEL, prompt, max_tokens=4, top_logprobs=3)
    expected = greedy(local, prompt, 4)
    assert [e["token"] for e in elements] == [t for t, _ in expected]
    assert [e["finish_reason"] for e in elements] == [None, None, None, "length"]
    for element, (_, logprob) in zip(elements, expected):
        assert element["logprob"] == pytest.approx(logprob, abs=1e-3)
        top = element["top_logprobs"]
        assert str(element["token"]) in top and len(top) == 3
        assert max(top.values()) == pytest.approx(element["logprob"])


def test_chunked_requests_with_logit_bias_follow_the_bias(client, local):
    """LMQL decodes in chunks: each GENERATE carries the prompt so far and ±100 biases."""
    prompt = prompt_of(local, "My favourite colour is")
    banned = greedy(local, prompt, 1)[0][0]
    forced = local.tokenize(" green")[0]
    bias = {str(banned): -100.0}
    first = client.generate(MODEL, prompt, stream_id=1, max_tokens=1, logit_bias=bias)
    assert first[0]["token"] != banned
    row = np.zeros(local.vocabulary.size, dtype=np.float32)
    row[banned] = -100
    assert first[0]["token"] == greedy(local, prompt, 1, bias=row)[0][0]
    second = client.generate(MODEL, prompt + [first[0]["token"]], stream_id=2, max_tokens=1,
                             logit_bias={str(forced): 100.0})
    assert second[0]["token"] == forced


def test_mask_extension_is_hard(client, local):
    prompt = prompt_of(local, "Answer yes or no:")
    allowed = local.tokenize(" maybe")[:1] + local.tokenize(" perhaps")[:1]
    elements = client.generate(MODEL, prompt, max_tokens=3, mask={"allow": allowed})
    assert all(e["token"] in allowed for e in elements)
    assert elements[0]["logprob"] > math.log(0.5) - 1e-6     # normalised over the two allowed
    denied = greedy(local, prompt, 1)[0][0]
    elements = client.generate(MODEL, prompt, stream_id=2, max_tokens=1, mask={"deny": [denied]})
    assert elements[0]["token"] != denied


def test_score_answers_each_token_log_probability(client, local):
    prompt = prompt_of(local, "One, two, three,")
    scored = local.tokenize(" four, five")
    client.send("SCORE", {"model": MODEL, "prompt": prompt, "scored": scored, "stream_id": 3})
    elements = client.stream(3)
    assert [e["token"] for e in elements] == scored
    assert [e["finish_reason"] for e in elements] == [None] * (len(scored) - 1) + ["stop"]
    sequence = local.sequence()
    try:
        for i, element in enumerate(elements):
            row = sequence.logits(prompt + scored[:i]).astype(np.float64)
            assert element["logprob"] == pytest.approx(row[scored[i]] - np.logaddexp.reduce(row), abs=1e-3)
    finally:
        sequence.release()


def test_constraint_program_is_enforced_and_checked(client, local):
    prompt = prompt_of(local, "Pick a digit:")
    program = {"grammar": None, "language": ["regex", "[0-9]"], "min_tokens": 0, "max_tokens": 3,
               "stops": []}
    elements = client.generate(MODEL, prompt, max_tokens=10, constraint=program)
    value = b"".join(local.vocabulary.token_bytes[e["token"]] for e in elements
                     if e["token"] not in local.vocabulary.end_ids)
    assert value.decode().isdigit() and len(value) == 1
    assert elements[-1]["hole"]["finish"] in ("end", "stop", "length")
    bad = {**program, "language": ["eval", "__import__('os')"]}
    [element] = client.generate(MODEL, prompt, stream_id=2, max_tokens=10, constraint=bad)
    assert element["error_type"] == "ConstraintError" and "malformed" in element["error"]


def test_cancel_ends_the_stream(client, local):
    client.send("GENERATE", {"model": MODEL, "prompt": prompt_of(local, "Once upon a time"),
                             "stream_id": 4, "max_tokens": 200})
    client.send("CANCEL", {"stream_id": 4})
    elements = client.stream(4)
    assert elements[-1]["finish_reason"] == "cancelled"
    assert len(elements) < 200


def test_bad_requests_get_error_answers_on_their_stream(client, local):
    prompt = prompt_of(local, "Hello")
    cases = [
        ("GENERATE", {"model": MODEL, "prompt": [10 ** 9], "stream_id": 11}, "out of range"),
        ("GENERATE", {"model": MODEL, "prompt": [1] * 1024, "stream_id": 12}, "context"),
        ("GENERATE", {"model": MODEL, "prompt": prompt, "stream_id": 13, "max_tokens": "x"}, "max_tokens"),
        ("GENERATE", {"model": "llama.cpp:other.gguf", "prompt": prompt, "stream_id": 14},
         "model 'llama.cpp:other.gguf' is not served here"),
        ("GENERATE", {"model": MODEL, "prompt": prompt, "stream_id": 15, "mask": {"allow": []}}, "mask"),
        ("SCORE", {"model": MODEL, "prompt": prompt, "stream_id": 16}, "scored"),
        ("GENERATE", {"model": MODEL, "prompt": prompt, "stream_id": 17, "temperature": -1}, "temperature"),
    ]
    for kind, payload, words in cases:
        client.send(kind, payload)
        frame_kind, [element] = client.frame()
        assert frame_kind == "TOKEN" and element["stream_id"] == payload["stream_id"]
        assert words in element["error"], (payload, element)
    for frame, words in [("GENERATE [1, 2]", "object"), ("HELLO {}", "unknown frame type"),
                         ("GENERATE {not json", "JSON"), ("CANCEL {\"stream_id\": 99}", "no open stream"),
                         ("GENERATE " + "[" * 50000, "JSON"),
                         ("GENERATE " + json.dumps({"model": MODEL, "prompt": [1] * 30000, "stream_id": 1}),
                          "exceeds")]:
        client.ws.send(frame)
        kind, [element] = client.frame()
        assert kind == "MSG" and words in element["error"], (frame[:40], element)
    assert client.generate(MODEL, prompt, stream_id=18, max_tokens=1)[0]["finish_reason"] == "length"


def test_too_many_streams_on_one_connection_is_an_error(client, local):
    prompt = prompt_of(local, "Count:")
    for stream_id in range(1, 6):
        client.send("GENERATE", {"model": MODEL, "prompt": prompt, "stream_id": stream_id, "max_tokens": 50})
    errors = []
    while not errors:
        _, elements = client.frame()
        errors = [e for e in elements if "error" in e]
    assert errors[0]["stream_id"] == 5 and "too many open streams" in errors[0]["error"]
    for stream_id in range(1, 5):
        client.send("CANCEL", {"stream_id": stream_id})


def wait_for_idle_slots(client, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        client.send("MODEL_INFO", {"model": MODEL, "stream_id": 0})
        kind, elements = client.frame()
        infos = [e["model_info"] for e in elements if "model_info" in e]
        if infos and infos[0]["busy_slots"] == 0 and infos[0]["waiting_streams"] == 0:
            return infos[0]
        assert time.monotonic() < deadline, infos
        time.sleep(0.2)


def test_disconnect_mid_stream_frees_the_slots(server, client, local):
    leaving = RawClient(server.url)
    hole = {"constraint": {"grammar": None, "min_tokens": 400, "max_tokens": 500, "stops": []}}
    for stream_id in (1, 2, 3):                 # two LMQL-style streams and one whole hole
        leaving.send("GENERATE", {"model": MODEL, "prompt": prompt_of(local, f"Story {stream_id}:"),
                                  "stream_id": stream_id, "max_tokens": 500,
                                  **(hole if stream_id == 3 else {})})
    leaving.frame()                       # they are running
    client.send("MODEL_INFO", {"model": MODEL, "stream_id": 0})
    _, [element] = client.frame()
    assert element["model_info"]["busy_slots"] + element["model_info"]["waiting_streams"] >= 1
    leaving.ws.socket.close()             # gone without a closing handshake
    wait_for_idle_slots(client)


def test_hostile_frames_never_disturb_valid_clients(server, local):
    """1,000 malformed or hostile frames from one client while two others decode."""
    prompt = prompt_of(local, "The sky is")
    expected = [t for t, _ in greedy(local, prompt, 2)]
    hostile = RawClient(server.url)
    frames = ["", " ", "GENERATE", "GENERATE {}", "GENERATE null", "SCORE []", "MODEL_INFO {}",
              "CANCEL {\"stream_id\": \"x\"}", "GENERATE {\"stream_id\": 1e400}", "\x00\x01",
              "GENERATE " + json.dumps({"model": MODEL, "prompt": [-1], "stream_id": 2}),
              "GENERATE " + json.dumps({"model": MODEL, "prompt": prompt, "stream_id": 3, "logit_bias": {"a": 1}}),
              "GENERATE " + json.dumps({"model": "__import__('os').system('touch /tmp/pwned')", "prompt": [1], "stream_id": 4}),
              "GENERATE " + json.dumps({"model": MODEL, "prompt": prompt, "stream_id": 5, "max_tokens": 10 ** 9}),
              "SCORE " + json.dumps({"model": MODEL, "prompt": prompt, "scored": [10 ** 6], "stream_id": 6}),
              "MODEL_INFO " + json.dumps({"model": MODEL, "stream_id": 7, "data": [1]}),
              "GENERATE " + json.dumps({"model": MODEL, "prompt": prompt, "stream_id": 8, "mask": {"allow": [1], "deny": [2]}}),
              "GENERATE " + json.dumps({"model": MODEL, "prompt": prompt, "stream_id": 9, "constraint": {"stops": [{"phrase": ""}]}}),
              b"\xff\xfe binary"]
    valid = [RawClient(server.url) for _ in range(2)]
    answers = 0
    sent = 0
    rounds = 0
    while sent < 1000:
        for i, client in enumerate(valid):
            client.send("GENERATE", {"model": MODEL, "prompt": prompt, "stream_id": rounds * 2 + i,
                                     "max_tokens": 2})
        for _ in range(125):
            hostile.ws.send(frames[sent % len(frames)])
            sent += 1
        for i, client in enumerate(valid):
            assert [e["token"] for e in client.stream(rounds * 2 + i)] == expected
        rounds += 1
    while answers < 1000:
        _, elements = hostile.frame()
        answers += len(elements)
        assert all("error" in e for e in elements)
    assert answers == 1000 and server.process.poll() is None
    assert not os.path.exists("/tmp/pwned")
    for client in [hostile, *valid]:
        client.close()


def test_token_is_required_when_set(local):
    server = ServerProcess(MODEL, "--n_ctx", "256", "--slots", "1", "--token", "s3cret")
    try:
        with pytest.raises(InvalidStatus) as refused:
            RawClient(server.url)
        assert refused.value.response.status_code == 401
        client = RawClient(server.url, additional_headers={"Authorization": "Bearer s3cret"})
        assert client.generate(MODEL, prompt_of(local, "Hi"), max_tokens=1)[0]["finish_reason"] == "length"
        client.close()
    finally:
        server.kill()


def test_relative_model_path_names_the_same_model_and_sigterm_ends_streams(local):
    directory, name = os.path.split(default_model_path())
    server = ServerProcess(f"llama.cpp:./{name}", "--n_ctx", "256", "--slots", "2", "--static",
                           cwd=directory)
    try:
        client = RawClient(server.url)
        client.send("GENERATE", {"model": MODEL, "prompt": prompt_of(local, "Once upon a time"),
                                 "stream_id": 1, "max_tokens": 200})
        _, elements = client.frame()
        assert "error" not in elements[0]          # the absolute id matched ./NAME
        server.process.send_signal(15)
        rest = client.stream(1)
        assert "shutting down" in rest[-1]["error"]
        assert server.process.wait(30) == 0
    finally:
        server.kill()


@pytest.mark.parametrize("args,code,words", [
    (["--n_ctx", "256"], 2, "not a model id"),
    (["--static"], 2, "nothing to serve: name a MODEL, or --models-dir DIR"),
    ([MODEL, "--slots", "0"], 2, "--slots must be at least 1"),
    ([MODEL, "stray"], 2, "unexpected argument 'stray'"),
    (["llama.cpp:/nonexistent/model.gguf"], 1, "model file not found: /nonexistent/model.gguf"),
])
def test_command_line_errors_name_the_culprit(args, code, words):
    process = subprocess.run([sys.executable, "-m", "lmq.cli", "serve-model", *args],
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == code and words in process.stderr, process.stderr
