"""A GGUF loaded into llama.cpp with lmq's own parameters.

lmq loads weights with `llama_model_load_from_file` and makes contexts with
`llama_init_from_model` itself instead of going through llama-cpp-python's `Llama`: the
fields lmq needs (`use_extra_bufts`, `n_seq_max`, `kv_unified`, automatic flash
attention) are not all reachable through `Llama()`, and a context made once with the
right parameters spares loading one and replacing it.

The keywords are `Llama()`'s names for llama.cpp's parameters, so model arguments written
for llama-cpp-python keep working; each maps to one field (tables below) or, for a few,
to a conversion. Keywords that configure only llama-cpp-python's own high-level API would
do nothing here: they are refused, saying what to use instead.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import llama_cpp

from lmq.errors import ModelError, QueryArgumentError

#: llama_model_params fields set as given
MODEL_FIELDS: dict[str, type] = {
    "n_gpu_layers": int, "split_mode": int, "main_gpu": int, "check_tensors": bool,
    "use_extra_bufts": bool,
}
#: llama_context_params fields set as given
CONTEXT_FIELDS: dict[str, type] = {
    "n_ctx": int, "n_batch": int, "n_ubatch": int, "n_threads": int, "n_threads_batch": int,
    "rope_scaling_type": int, "pooling_type": int, "attention_type": int,
    "rope_freq_base": float, "rope_freq_scale": float, "yarn_ext_factor": float,
    "yarn_attn_factor": float, "yarn_beta_fast": float, "yarn_beta_slow": float,
    "yarn_orig_ctx": int, "type_k": int, "type_v": int, "offload_kqv": bool,
    "op_offload": bool, "swa_full": bool, "no_perf": bool,
}
#: keywords converted rather than copied
CONVERTED = frozenset({"use_mmap", "use_mlock", "tensor_split", "kv_overrides", "flash_attn",
                       "lora_path", "lora_scale", "numa", "verbose"})
#: `Llama()` keywords of llama-cpp-python's high-level API, and what lmq has instead
NOT_IN_LMQ = {
    "seed": "the seed is a decoder argument: sample(seed=…)",
    "chat_format": "lmq renders the GGUF's own chat template",
    "chat_handler": "lmq renders the GGUF's own chat template",
    "draft_model": "speculative decoding is not part of lmq",
    "tokenizer": "lmq tokenizes with the GGUF's own tokenizer",
    "logits_all": "lmq asks llama.cpp for exactly the logits it uses",
    "embedding": "lmq does not compute embeddings",
    "last_n_tokens_size": "the repeat-penalty window is a decoder argument: penalty_last_n=…",
    "spm_infill": "lmq has no infill API",
    "lora_base": "llama.cpp applies adapters to the loaded weights (lora_path=)",
    "vocab_only": "a vocabulary without weights is model='random' with vocab=PATH",
}
#: lmq's defaults: a context for long prompts; every core (llama.cpp's default is 4)
DEFAULTS = {"n_ctx": 4096}
#: more layers than any model has: llama.cpp offloads them all
ALL_LAYERS = 0x7FFFFFFF

_backend_ready = False
_backend_lock = threading.Lock()


def cpu_has_amx() -> bool:
    """Whether this CPU reports AMX tiles (Linux). llama.cpp's AMX matrix kernels crash
    with SIGILL on such CPUs when the weights sit in the AMX buffer type (an open
    llama.cpp bug), so lmq keeps weights out of the extra buffer types there."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def check_keywords(options: dict[str, Any]) -> None:
    """Every keyword is one lmq knows: unknown names and Llama()-only ones are errors."""
    for name in options:
        if name in NOT_IN_LMQ:
            raise QueryArgumentError(f"llama.cpp argument {name} has no meaning in lmq: {NOT_IN_LMQ[name]}")
    unknown = sorted(set(options) - MODEL_FIELDS.keys() - CONTEXT_FIELDS.keys() - CONVERTED)
    if unknown:
        raise QueryArgumentError(f"unknown llama.cpp argument{'s' if len(unknown) > 1 else ''}: "
                                 f"{', '.join(unknown)}")


def _set(struct: ctypes.Structure, name: str, kind: type, value: Any) -> None:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QueryArgumentError(f"llama.cpp argument {name} must be {kind.__name__}, not {value!r}")
    try:
        setattr(struct, name, value)
    except (TypeError, ValueError, OverflowError) as e:
        raise QueryArgumentError(f"llama.cpp argument {name}={value!r}: {e}") from None


class LlamaModel:
    """A GGUF's weights in llama.cpp (`llama_model *`) and the context parameters lmq
    makes its contexts with. `close()` frees the weights; contexts are freed by their
    owners (`llama_free`) before that."""

    def __init__(self, path: str, **options: Any):
        check_keywords(options)
        options = {**DEFAULTS, **options}
        options.pop("verbose", None)            # the backend shows or hides llama.cpp's log
        _init_backend(options.pop("numa", False))
        self.path = path
        self._keep: list[Any] = []          # ctypes arrays the parameter structs point into
        self.model_params = self._model_params(options)
        self.context_params = self._context_params(options)
        self.lora_path: str | None = options.get("lora_path")
        self.lora_scale: float = float(options.get("lora_scale", 1.0))
        self.model = llama_cpp.llama_model_load_from_file(path.encode("utf-8"), self.model_params)
        if not self.model:
            raise ModelError(f"llama.cpp could not load {path}")
        self._adapter = None
        if self.lora_path is not None:
            self._adapter = llama_cpp.llama_adapter_lora_init(self.model, str(self.lora_path).encode("utf-8"))
            if not self._adapter:
                self.close()
                raise ModelError(f"llama.cpp could not load the LoRA adapter {self.lora_path}")

    def _model_params(self, options: dict[str, Any]) -> llama_cpp.llama_model_params:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = not cpu_has_amx()
        for name, kind in MODEL_FIELDS.items():
            if name in options:
                _set(params, name, kind, options[name])
        if params.n_gpu_layers < 0:
            params.n_gpu_layers = ALL_LAYERS
        mmap, mlock = options.get("use_mmap", True), options.get("use_mlock", False)
        if options.get("lora_path") is not None:
            mmap = False                    # an adapter is merged into weights it may write
        params.load_mode = {(True, False): llama_cpp.LLAMA_LOAD_MODE_MMAP,
                            (True, True): llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
                            (False, True): llama_cpp.LLAMA_LOAD_MODE_MLOCK,
                            (False, False): llama_cpp.LLAMA_LOAD_MODE_NONE}[bool(mmap), bool(mlock)]
        if options.get("tensor_split") is not None:
            params.tensor_split = self._tensor_split(options["tensor_split"])
        if options.get("kv_overrides"):
            params.kv_overrides = self._kv_overrides(options["kv_overrides"])
        return params

    def _context_params(self, options: dict[str, Any]) -> llama_cpp.llama_context_params:
        params = llama_cpp.llama_context_default_params()
        threads = options.get("n_threads") or os.cpu_count() or 1
        params.n_threads = threads
        params.n_threads_batch = threads
        for name, kind in CONTEXT_FIELDS.items():
            if name in options and options[name] is not None:
                _set(params, name, kind, options[name])
        flash = options.get("flash_attn")
        if flash not in (None, "auto", True, False):
            raise QueryArgumentError(f"llama.cpp argument flash_attn must be True, False or 'auto', not {flash!r}")
        params.flash_attn_type = {None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                  "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                  True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash]
        if 0 < params.n_ctx < params.n_batch:
            params.n_batch = params.n_ctx
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        return params

    def _tensor_split(self, split: Any) -> Any:
        if not isinstance(split, (list, tuple)) or not all(isinstance(x, (int, float)) for x in split):
            raise QueryArgumentError(f"llama.cpp argument tensor_split must be a list of numbers, not {split!r}")
        if len(split) > llama_cpp.LLAMA_MAX_DEVICES:
            raise QueryArgumentError(f"tensor_split names {len(split)} devices; llama.cpp has room for "
                                     f"{llama_cpp.LLAMA_MAX_DEVICES}")
        array = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*split)
        self._keep.append(array)
        return ctypes.cast(array, ctypes.POINTER(ctypes.c_float))

    def _kv_overrides(self, overrides: Any) -> Any:
        if not isinstance(overrides, dict):
            raise QueryArgumentError(f"llama.cpp argument kv_overrides must be a dict, not {overrides!r}")
        array = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
        for entry, (key, value) in zip(array, overrides.items()):
            entry.key = str(key).encode("utf-8")
            if isinstance(value, bool):
                entry.tag, entry.value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
            elif isinstance(value, int):
                entry.tag, entry.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
            elif isinstance(value, float):
                entry.tag, entry.value.val_f64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
            elif isinstance(value, str) and len(value.encode("utf-8")) < 128:
                entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                text = value.encode("utf-8")
                offset = llama_cpp.llama_model_kv_override_value.val_str.offset
                ctypes.memmove(ctypes.addressof(entry.value) + offset, text, len(text))
            else:
                raise QueryArgumentError(f"kv_overrides[{key!r}]: a bool, int, float or a string "
                                         f"under 128 bytes, not {value!r}")
        self._keep.append(array)
        return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_kv_override))

    def new_context(self, **changes: Any) -> llama_cpp.llama_context_p:
        """A context on these weights with lmq's parameters (`changes` override fields such
        as `n_seq_max`); the caller frees it with `llama_free`."""
        params = llama_cpp.llama_context_params.from_buffer_copy(self.context_params)
        for name, value in changes.items():
            setattr(params, name, value)
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise ModelError(f"llama.cpp could not create a context for {self.path} "
                             f"(n_ctx={params.n_ctx}, n_seq_max={params.n_seq_max})")
        if self._adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            scales = (ctypes.c_float * 1)(self.lora_scale)
            if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales):
                llama_cpp.llama_free(ctx)
                raise ModelError(f"llama.cpp could not apply the LoRA adapter {self.lora_path}")
        return ctx

    def close(self) -> None:
        if self._adapter is not None:
            llama_cpp.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def _init_backend(numa: bool | int) -> None:
    """llama.cpp's process-wide set-up, once (NUMA placement can only be chosen then)."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        llama_cpp.llama_backend_init()
        strategy = (llama_cpp.GGML_NUMA_STRATEGY_DISTRIBUTE if numa is True else
                    llama_cpp.GGML_NUMA_STRATEGY_DISABLED if numa is False else int(numa))
        if strategy != llama_cpp.GGML_NUMA_STRATEGY_DISABLED:
            llama_cpp.llama_numa_init(strategy)
        _backend_ready = True
