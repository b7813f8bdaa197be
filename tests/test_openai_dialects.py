"""The `openai:` backend's dialects. vLLM and SGLang cannot run on these machines: their
requests are checked against those engines' documented request schemas (vLLM's
`structured_outputs` choice/grammar and `return_tokens_as_token_ids`, SGLang's `ebnf`
and `no_stop_trim`) on a stand-in server that records them and answers in the OpenAI
stream format. The llama-server dialect runs against the real llama-server too
(tests/test_llama_server.py fixture)."""

import http.server
import json
import threading

import pytest

import lmq
from lmq.backends import default_model_path
from lmq.errors import ModelError, QueryArgumentError

PATH = default_model_path()


class _OpenAiStub(http.server.BaseHTTPRequestHandler):
    """/v1/models with one model; /v1/completions records the body and streams
    `server.answer` (one chunk per token, in the dialect's token format)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = json.dumps({"data": [{"id": "smol", "max_model_len": 2048, "root": PATH}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for chunk in self.server.answer:
            self.wfile.write(b"data: " + json.dumps({"choices": [chunk]}).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenAiStub)
    server.daemon_threads = True
    server.bodies = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _model(stub, dialect, **kwargs):
    return lmq.model(f"openai:http://127.0.0.1:{stub.server_port}/v1", dialect=dialect, **kwargs)


def test_vllm_sends_a_choice_list_and_reads_token_ids(stub):
    model = _model(stub, "vllm")
    backend = model.backend()
    tokens = backend.tokenize(" green")
    stub.answer = [{"text": backend.token_text(t), "logprobs": {"tokens": [f"token_id:{t}"],
                                                                "token_logprobs": [-0.5]}}
                   for t in tokens] + [{"text": "", "finish_reason": "stop"}]
    result = lmq.run_sync('"Colour:[C]" where C in [" red", " green"]', model=model,
                          decoder="sample(temperature=0.7, top_k=5, seed=1)")
    assert result.variables["C"] == " green" and result.tokens["C"] == tokens
    body = stub.bodies[0]
    assert body["structured_outputs"] == {"choice": [" green", " red"]}
    assert body["return_tokens_as_token_ids"] is True and body["logprobs"] == 1
    assert body["model"] == "smol" and body["stream"] is True
    assert body["prompt"] == backend.vocabulary.prompt_start + backend.tokenize("Colour:")
    assert (body["temperature"], body["top_k"], body["repetition_penalty"]) == (0.7, 5, 1.0)
    assert isinstance(body["seed"], int) and "typical_p" not in body


def test_vllm_sends_other_languages_as_a_grammar_with_stops(stub):
    model = _model(stub, "vllm")
    stub.answer = [{"text": "", "logprobs": {"tokens": [f"token_id:{t}" for t in model.backend().tokenize("ab.")],
                                             "token_logprobs": [-1.0] * 3}, "finish_reason": "stop"}]
    result = lmq.run_sync('"x:[X]" where REGEX(X, "[a-z]+") and STOPS_BEFORE(X, ".")', model=model)
    assert result.variables["X"] == "ab"
    body = stub.bodies[0]
    assert "root ::=" in body["structured_outputs"]["grammar"] and body["stop"] == ["."]


def test_sglang_sends_ebnf_keeps_stops_and_tokenizes_the_text(stub):
    model = _model(stub, "sglang")
    stub.answer = [{"text": " cat"}, {"text": ".", "finish_reason": "stop"}]
    result = lmq.run_sync('"x:[X]" where REGEX(X, " [a-z]+\\\\.") and STOPS_AT(X, ".")', model=model)
    assert result.variables["X"] == " cat."
    assert result.tokens["X"] == model.backend().tokenize(" cat.")
    body = stub.bodies[0]
    assert "root ::=" in body["ebnf"] and body["no_stop_trim"] is True and body["stop"] == ["."]


def test_a_knob_the_dialect_lacks_is_named(stub):
    with pytest.raises(ModelError, match="mirostat is not supported by the OpenAI-compatible vllm server"):
        lmq.run_sync('"x:[X]"', model=_model(stub, "vllm"), decoder="sample(mirostat=2)")


def test_an_unknown_dialect_is_named(stub):
    with pytest.raises(QueryArgumentError, match="unknown dialect 'tgi'.*llama-server, vllm, sglang"):
        _model(stub, "tgi").backend()


def test_a_model_the_server_lacks_is_named(stub):
    with pytest.raises(ModelError, match="serves no model 'other'.*smol"):
        _model(stub, "vllm", model="other").backend()
