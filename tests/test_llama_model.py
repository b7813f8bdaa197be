"""lmq's own llama.cpp model and context: parameters, AMX safety, freeing, empty prompts.

The long-prompt test is the one that crashed with SIGILL on AMX CPUs (Sapphire Rapids
and later) when the weights sat in llama.cpp's AMX buffer type: any batch of many tokens
reached its kernels. It runs everywhere; on a CPU without AMX it checks the decode only."""

import gc
import os

import numpy as np
import pytest

import lmq
from lmq.backends import default_model_path, load_backend
from lmq.backends.llama_cpp import LlamaCppBackend
from lmq.backends.llama_model import ALL_LAYERS, LlamaModel, cpu_has_amx
from lmq.errors import ModelError, QueryArgumentError
from lmq.runtime.chat import ChatTemplate

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def backend():
    return load_backend(None)


def test_weights_stay_out_of_extra_buffer_types_on_amx_cpus(backend):
    assert backend.model.model_params.use_extra_bufts is (not cpu_has_amx())


def test_a_long_prompt_decodes_in_multi_token_batches(backend):
    text = " ".join(f"item {i}," for i in range(150))          # well over 300 tokens
    tokens = backend.tokenize(text)
    assert len(tokens) >= 300
    sequence = backend.sequence()
    try:
        row = np.array(sequence.logits(tokens))
        again = backend.sequence()
        try:                                # the same prompt in chunks of 64 tokens
            for start in range(0, len(tokens), 64):
                step = again.logits(tokens[:start + 64])
            assert np.isfinite(row).all()
            assert int(np.argmax(step)) == int(np.argmax(row))
        finally:
            again.release()
    finally:
        sequence.release()


def test_extra_buffer_types_are_the_users_choice():
    model = LlamaModel(default_model_path(), use_extra_bufts=True, n_ctx=256)
    try:
        assert model.model_params.use_extra_bufts is True
    finally:
        model.close()


def test_llama_keywords_reach_the_model_and_context():
    model = LlamaModel(default_model_path(), n_ctx=512, n_batch=128, n_ubatch=64, n_threads=1,
                       flash_attn=False, type_k=1, type_v=1, n_gpu_layers=-1, use_mmap=False,
                       kv_overrides={"tokenizer.ggml.add_bos_token": True}, rope_freq_base=0)
    try:
        c = model.context_params
        assert (c.n_ctx, c.n_batch, c.n_ubatch, c.n_threads, c.n_threads_batch) == (512, 128, 64, 1, 1)
        assert c.flash_attn_type == 0
        assert model.model_params.n_gpu_layers == ALL_LAYERS
        from lmq.backends.gguf import GgufVocab
        assert GgufVocab(model.model).vocabulary().add_bos is True    # the override took
    finally:
        model.close()


def test_flash_attention_is_llama_cpps_automatic_choice_by_default(backend):
    assert backend.model.context_params.flash_attn_type == -1      # LLAMA_FLASH_ATTN_TYPE_AUTO


@pytest.mark.parametrize("kwargs,words", [
    ({"n_gpu_layer": 1}, ["unknown llama.cpp argument", "n_gpu_layer"]),
    ({"seed": 3}, ["seed", "decoder argument"]),
    ({"chat_format": "chatml"}, ["chat_format", "chat template"]),
    ({"n_ctx": "big"}, ["n_ctx", "int"]),
    ({"flash_attn": "yes"}, ["flash_attn", "auto"]),
    ({"tensor_split": [1.0] * 4096}, ["tensor_split", "devices"]),
    ({"kv_overrides": {"general.name": object()}}, ["kv_overrides", "general.name"]),
])
def test_bad_llama_keywords_are_named_before_loading(kwargs, words):
    with pytest.raises(QueryArgumentError) as error:
        LlamaCppBackend(default_model_path(), **kwargs)
    assert all(word in str(error.value) for word in words)


def test_a_missing_lora_adapter_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="LoRA"):
        LlamaModel(default_model_path(), lora_path=str(tmp_path / "none.gguf"), n_ctx=256)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_loading_and_closing_twenty_times_leaves_memory_flat():
    def cycle():
        backend = LlamaCppBackend(default_model_path(), n_ctx=512)
        sequence = backend.sequence()
        sequence.logits(backend.tokenize("Hello there"))
        backend.close()
        gc.collect()

    for _ in range(3):                       # allocator pools settle
        cycle()
    before = _rss_mib()
    for _ in range(20):
        cycle()
    grown = _rss_mib() - before
    assert grown < 40, f"RSS grew by {grown:.0f} MiB over 20 load/close cycles"


def test_the_chat_template_is_compiled_once(backend):
    assert ChatTemplate.of(backend).template is ChatTemplate.of(backend).template


def test_a_query_may_begin_with_a_hole(backend):
    assert lmq.run_sync('"[A]" where A == "1"').variables["A"] == "1"
    value = lmq.F("[X]", "len(TOKENS(X)) < 4")()
    assert isinstance(value, str) and value
    start = backend.vocabulary.nonempty([])
    assert start == [backend.vocabulary.bos_id]


@pytest.mark.parametrize("decoder", ["argmax", "sample(n=2, seed=5)", "argmax(n=2)", "beam(n=2)"])
def test_every_decoder_runs_a_query_that_begins_with_a_hole(decoder):
    results = lmq.run_sync('"[A] and[B]" where len(TOKENS(A)) < 4 and B in [" yes", " no"]',
                           decoder=decoder)
    results = results if isinstance(results, list) else [results]
    for result in results:
        assert result.variables["B"] in (" yes", " no")
        assert result.prompt == f'{result.variables["A"]} and{result.variables["B"]}'


def test_an_empty_prompt_scores_and_generates():
    model = lmq.model()
    assert model.score_sync("", [" 4", " 5"]).probs().sum() == pytest.approx(1.0)
    assert isinstance(model.generate_sync("", max_tokens=3), str)


def test_tokenizing_from_many_threads_gives_each_its_own_tokens(backend):
    from concurrent.futures import ThreadPoolExecutor
    texts = [f"sentence number {i} " * (1 + i % 7) for i in range(200)]
    expected = [backend.tokenize(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(backend.tokenize, texts)) == expected
