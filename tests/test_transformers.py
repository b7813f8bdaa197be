"""The transformers backend: SmolLM2 loaded from its GGUF through transformers (torch CPU,
no download), in process and served by a real `lmq serve-model` subprocess."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"          # never a hub download, here or in the server

import numpy as np
import pytest

import lmq
from lmq.backends import default_model_path, load_backend
from lmtp_harness import ServerProcess

pytestmark = pytest.mark.model

DIRECTORY, NAME = os.path.split(default_model_path())
QUERIES = [
    '"Q: What is the capital of France?\\nA:[A]" where STOPS_AT(A, ".") and len(TOKENS(A)) < 8',
    '"Count: one, two, three,[X]" where STOPS_BEFORE(X, ",") and len(TOKENS(X)) < 5',
]


@pytest.fixture(scope="module")
def served():
    """The server loads its copy while this process loads its own (two cores, one wait)."""
    server = ServerProcess(f"transformers:{DIRECTORY}", "--gguf_file", NAME, "--slots", "2",
                           wait=False)
    try:
        model = lmq.model(f"local:transformers:{DIRECTORY}", gguf_file=NAME)
        model.backend()
        server.wait_ready(timeout=600)
        yield model, server
    finally:
        server.kill()


def test_weights_from_the_gguf_agree_with_llama_cpp(served):
    model, _ = served
    backend = model.backend()
    llama = load_backend(None, n_ctx=512)
    assert backend.vocabulary == llama.vocabulary
    prompt = llama.tokenize("The capital of France is")
    torch_row = backend.sequence().logits(prompt)
    sequence = llama.sequence()
    llama_row = np.array(sequence.logits(prompt))
    sequence.release()
    assert int(torch_row.argmax()) == int(llama_row.argmax())
    assert np.corrcoef(torch_row, llama_row)[0, 1] > 0.98      # Q4_1 dequantized vs quantized


def test_diverging_token_lists_reuse_only_the_common_prefix(served):
    backend = served[0].backend()
    a, b, c = backend.tokenize("One two three"), backend.tokenize(" four"), backend.tokenize(" five six")
    reused = backend.sequence()
    reused.logits(a + b)
    before = backend.evaluated_tokens
    row = reused.logits(a + c)
    assert backend.evaluated_tokens - before == len(c)
    fresh = backend.sequence().logits(a + c)
    np.testing.assert_allclose(row, fresh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("query", QUERIES)
def test_served_queries_equal_the_in_process_run(served, query):
    model, server = served
    remote = lmq.model(server.url.replace("ws://", "lmtp://") + f"transformers:{DIRECTORY}")
    here = lmq.run_sync(query, model=model)
    there = lmq.run_sync(query, model=remote)
    assert (there.variables, there.tokens, there.prompt) == (here.variables, here.tokens, here.prompt)
    assert there.logprob == pytest.approx(here.logprob, abs=1e-4)


def test_missing_gguf_file_is_a_clear_error():
    with pytest.raises(lmq.QueryArgumentError, match="gguf_file"):
        lmq.model(f"local:transformers:{DIRECTORY}").backend()
    with pytest.raises(lmq.ModelError, match="not found"):
        lmq.model(f"local:transformers:{DIRECTORY}", gguf_file="missing.gguf").backend()
