"""The models a server serves: model ids → backends, matched by resolved path.

`llama.cpp:model.gguf`, `llama.cpp:./model.gguf` and `local:llama.cpp:/abs/model.gguf`
name the same model (relative paths resolve against the server's working directory), so
a client's id and the command line's need not be spelled alike. Without `--static`, a
model that is not loaded yet is loaded on demand, off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from lmq.backends.base import Backend
from lmq.errors import LmqError
from lmq.serve.protocol import ProtocolError
from lmq.serve.scheduler import ModelWorker

ModelKey = tuple[str, str]      # (engine, resolved path or name)

_ENGINES = {"llama.cpp:": "llama.cpp", "local:llama.cpp:": "llama.cpp",
            "transformers:": "transformers", "local:transformers:": "transformers"}


def model_key(model_id: str) -> ModelKey:
    """(engine, resolved location) of a model id; a `ProtocolError` for other ids."""
    for prefix in sorted(_ENGINES, key=len, reverse=True):
        if model_id.startswith(prefix):
            location = model_id[len(prefix):]
            if not location:
                break
            candidate = os.path.abspath(os.path.expanduser(location))
            if _ENGINES[prefix] == "llama.cpp" or os.path.exists(candidate):
                location = candidate
            return _ENGINES[prefix], location
    raise ProtocolError(f"unknown model id {model_id[:200]!r} (expected llama.cpp:PATH.gguf or "
                        "transformers:DIR)")


def create_backend(key: ModelKey, kwargs: dict[str, Any], slots: int) -> Backend:
    """A backend for `key` able to hold `slots` sequences at once."""
    engine, location = key
    if engine == "llama.cpp":
        from lmq.backends.llama_cpp import LlamaCppBackend
        return LlamaCppBackend(location, n_seq_max=slots, **kwargs)
    from lmq.backends.transformers import TransformersBackend
    return TransformersBackend(location, **kwargs)


class ModelRegistry:
    """The loaded models of a server and the policy for loading others."""

    def __init__(self, backend_kwargs: dict[str, Any], slots: int, static: bool, max_models: int):
        self.backend_kwargs = backend_kwargs
        self.slots = slots
        self.static = static
        self.max_models = max_models
        self.workers: dict[ModelKey, ModelWorker] = {}
        self._loading: dict[ModelKey, asyncio.Future] = {}

    def load(self, model_id: str) -> ModelWorker:
        """Load a model now (the command line's model, before serving starts)."""
        key = model_key(model_id)
        if key not in self.workers:
            backend = create_backend(key, self.backend_kwargs, self.slots)
            self.workers[key] = ModelWorker(f"{key[0]}:{key[1]}", backend, self.slots)
        return self.workers[key]

    async def get(self, model_id: str) -> ModelWorker:
        """The worker of a requested model, loading it on demand unless `--static`."""
        key = model_key(model_id)
        worker = self.workers.get(key)
        if worker is not None:
            return worker
        if self.static:
            raise ProtocolError(f"model {model_id[:200]!r} is not served here (the server runs "
                                "with --static)")
        pending = self._loading.get(key)
        if pending is None:
            if len(self.workers) + len(self._loading) >= self.max_models:
                raise ProtocolError(f"cannot load {model_id[:200]!r}: the server already serves "
                                    f"{self.max_models} models (--max-models)")
            print(f"lmq serve-model: loading {model_id} on demand", file=sys.stderr, flush=True)
            loop = asyncio.get_running_loop()
            pending = self._loading[key] = loop.run_in_executor(None, self.load, model_id)
        try:
            return await asyncio.shield(pending)
        except LmqError as e:
            raise ProtocolError(str(e)) from None
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"cannot load {model_id[:200]!r}: {e}") from None
        finally:
            self._loading.pop(key, None)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
