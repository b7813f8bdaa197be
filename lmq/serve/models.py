"""The models a server serves: model ids → backends, and which ids a client may name.

A client may name the models the server was started with and, with `--models-dir DIR`,
the regular `.gguf` files inside DIR; nothing else. The command line's model matches by
its resolved path (`llama.cpp:model.gguf`, `llama.cpp:./model.gguf` and
`local:llama.cpp:/abs/model.gguf` are one model; relative paths against the server's
working directory) without the client's path ever touching the filesystem. An id inside
DIR (relative ids resolve against DIR) is resolved to its real path, which must stay in
DIR, be a regular `.gguf` file and start with the GGUF magic; a real path already loaded
(a symlink to the served model) reuses that model. Every other id gets one answer, "model
… is not served here", whatever the path is (missing, a directory, a FIFO, not a GGUF,
outside DIR): the reason goes to the server's log only, so a client learns nothing about
the filesystem. Models in DIR load on demand, off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from typing import Any

from lmq.backends.base import Backend
from lmq.errors import QueryArgumentError
from lmq.serve.compiling import CompileLimits, ConstraintCompiler
from lmq.serve.protocol import ProtocolError, shown
from lmq.serve.scheduler import ModelWorker

ModelKey = tuple[str, str]      # (engine, resolved path or name)

_ENGINES = {"llama.cpp:": "llama.cpp", "local:llama.cpp:": "llama.cpp",
            "transformers:": "transformers", "local:transformers:": "transformers"}
_GGUF_MAGIC = b"GGUF"


class NotServed(Exception):
    """Why an id names no model a client may use (for the log; the client is told less)."""


def split_model_id(model_id: str) -> ModelKey:
    """(engine, location as written) of a model id; `NotServed` for other ids."""
    for prefix in sorted(_ENGINES, key=len, reverse=True):
        if model_id.startswith(prefix) and len(model_id) > len(prefix):
            return _ENGINES[prefix], model_id[len(prefix):]
    raise NotServed("not a model id (llama.cpp:PATH.gguf or transformers:DIR)")


def _lexical_key(engine: str, location: str) -> ModelKey:
    """The key an id's spelling names: its absolute path, normalised without reading the
    filesystem (a transformers name that is no path stays as it is)."""
    if engine == "llama.cpp" or os.sep in location or location.startswith("."):
        return engine, os.path.abspath(location)
    return engine, location


def create_backend(key: ModelKey, kwargs: dict[str, Any], slots: int) -> Backend:
    """A backend for `key` able to hold `slots` sequences at once."""
    engine, location = key
    if engine == "llama.cpp":
        from lmq.backends.llama_cpp import LlamaCppBackend
        return LlamaCppBackend(location, n_seq_max=slots, **kwargs)
    from lmq.backends.transformers import TransformersBackend
    return TransformersBackend(location, **kwargs)


def _inside(path: str, directory: str) -> bool:
    """Whether the absolute `path` lies below `directory` (not the directory itself)."""
    return path != directory and os.path.commonpath([path, directory]) == directory


def _real_path(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError) as e:          # a NUL byte, a symlink loop, a name too long
        raise NotServed(f"unresolvable path: {e}") from None


def check_gguf(real: str, directory: str) -> None:
    """`NotServed` unless the real path `real` is a regular `.gguf` file inside `directory`
    starting with the GGUF magic. Only a regular file is ever opened, and without blocking
    (a FIFO swapped in after the check is refused by `fstat`)."""
    if not _inside(real, directory):
        raise NotServed(f"outside --models-dir (resolves to {real})")
    if not real.endswith(".gguf"):
        raise NotServed(f"{real} is not a .gguf file")
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise NotServed(f"{real} is not a regular file")
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        raise NotServed(f"{real}: {e.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise NotServed(f"{real} is not a regular file")
        if file.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise NotServed(f"{real} is not a GGUF file")


class ModelRegistry:
    """The loaded models of a server and the policy for loading others."""

    def __init__(self, backend_kwargs: dict[str, Any], slots: int, max_models: int,
                 models_dir: str | None = None, compile_limits: CompileLimits = CompileLimits()):
        self.backend_kwargs = backend_kwargs
        self.compile_limits = compile_limits
        self.slots = slots
        self.max_models = max_models
        self.models_dir = os.path.realpath(models_dir) if models_dir is not None else None
        # a client may spell DIR as the operator did or as its real path (/tmp → /private/tmp)
        self._dir_spellings = {self.models_dir, os.path.abspath(models_dir)} if models_dir else set()
        self.workers: dict[ModelKey, ModelWorker] = {}
        self._names: dict[ModelKey, ModelKey] = {}    # spellings and real paths → worker key
        self._loading: dict[ModelKey, asyncio.Future] = {}

    def load(self, model_id: str) -> ModelWorker:
        """Load the command line's model now, before serving starts (its errors are the
        operator's to see in full)."""
        try:
            engine, location = split_model_id(model_id)
            key = _lexical_key(engine, os.path.expanduser(location))
        except NotServed as e:
            raise QueryArgumentError(f"serve-model: {model_id!r} is {e}") from None
        if key not in self._names:
            self._add(key, create_backend(key, self.backend_kwargs, self.slots))
        return self.workers[self._names[key]]

    def _add(self, key: ModelKey, backend: Backend) -> None:
        compiler = ConstraintCompiler(backend.vocabulary, self.compile_limits)
        compiler.wait_started()
        self.workers[key] = ModelWorker(f"{key[0]}:{key[1]}", backend, self.slots, compiler)
        self._names[key] = key
        if os.path.exists(key[1]):
            self._names[(key[0], os.path.realpath(key[1]))] = key

    async def get(self, model_id: str) -> ModelWorker:
        """The worker of a model a client names, loading a model of `--models-dir` on
        demand; one uniform `ProtocolError` for every id that names no model served here."""
        try:
            engine, location = split_model_id(model_id)
            key = self._names.get(_lexical_key(engine, location))
            if key is not None:
                return self.workers[key]
            return await self._from_directory(engine, location)
        except NotServed as e:
            print(f"lmq serve-model: refused model {shown(model_id)}: {shown(str(e), 1000)}",
                  file=sys.stderr, flush=True)
            raise ProtocolError(f"model {shown(model_id)} is not served here") from None

    async def _from_directory(self, engine: str, location: str) -> ModelWorker:
        if self.models_dir is None:
            raise NotServed("not the served model, and no --models-dir")
        if engine != "llama.cpp":
            raise NotServed("--models-dir serves llama.cpp GGUF files only")
        named = os.path.abspath(os.path.join(self.models_dir, location))
        if not any(_inside(named, spelling) for spelling in self._dir_spellings):
            raise NotServed("outside --models-dir")
        loop = asyncio.get_running_loop()
        real = await loop.run_in_executor(None, _real_path, named)
        key = (engine, real)
        known = self._names.get(key)
        if known is not None:           # a symlink to a loaded model: that model, no copy
            return self.workers[known]
        await loop.run_in_executor(None, check_gguf, real, self.models_dir)
        pending = self._loading.get(key)
        if pending is None:
            if len(self.workers) + len(self._loading) >= self.max_models:
                raise ProtocolError(f"cannot load another model: the server already serves "
                                    f"{self.max_models} (--max-models)")
            print(f"lmq serve-model: loading {shown(real, 1000)} on demand", file=sys.stderr, flush=True)
            pending = self._loading[key] = loop.run_in_executor(None, self._load_file, key)
        try:
            return await asyncio.shield(pending)
        except Exception as e:          # whatever a broken file makes the backend raise
            raise NotServed(f"loading {real} failed: {e}") from None
        finally:
            self._loading.pop(key, None)

    def _load_file(self, key: ModelKey) -> ModelWorker:
        self._add(key, create_backend(key, self.backend_kwargs, self.slots))
        return self.workers[key]

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
