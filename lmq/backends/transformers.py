"""transformers/torch in this process: `local:transformers:DIR` with `gguf_file=NAME.gguf`.

The weights come from the GGUF through `AutoModelForCausalLM.from_pretrained(DIR,
gguf_file=NAME)` (transformers dequantizes them; no hub download), and the tokenizer,
vocabulary bytes, end tokens and chat template from the same GGUF through llama.cpp's
vocabulary loader, exactly as for the llama.cpp backend: masks, stops and prompts see the
same bytes whichever engine computes the logits. Each `Sequence` keeps its own
key/value cache (a transformers `DynamicCache`), cropped to the common prefix when a new
token list diverges, so a prompt is evaluated once.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

from lmq.backends.base import Sequence, common_prefix
from lmq.backends.gguf import GgufBackend, check_gguf, load_vocab_only
from lmq.errors import ContextLimitError, ModelError, QueryArgumentError


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ModelError(f"the transformers backend needs torch and transformers ({e.name} is not "
                         "installed): pip install 'lmq[transformers]'") from None
    return torch, transformers


class TransformersBackend(GgufBackend):
    """A GGUF model evaluated by transformers on torch (CPU, or `device="cuda"`)."""

    def __init__(self, location: str, gguf_file: str | None = None, device: str = "cpu",
                 dtype: str | None = None, n_ctx: int | None = None, **model_kwargs: Any):
        if gguf_file is None:
            raise QueryArgumentError(f"local:transformers:{location} needs gguf_file=NAME.gguf: "
                                     "this version loads weights and tokenizer from a GGUF")
        directory = os.path.abspath(os.path.expanduser(location))
        path = check_gguf(os.path.join(directory, gguf_file))
        torch, transformers = _import_torch()
        if dtype is not None:
            model_kwargs["dtype"] = getattr(torch, str(dtype), None)
            if not isinstance(model_kwargs["dtype"], torch.dtype):
                raise QueryArgumentError(f"dtype={dtype!r} is not a torch dtype (float32, bfloat16, …)")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=gguf_file, local_files_only=True, **model_kwargs)
            self.model = model.to(device).eval()
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise ModelError(f"transformers could not load {path}: {e}") from None
        self.torch = torch
        self.device = device
        super().__init__(load_vocab_only(path), path)
        width = self.model.get_output_embeddings().weight.shape[0]
        if width < self.vocabulary.size:
            raise ModelError(f"{path}: the model has {width} output logits for a vocabulary of "
                             f"{self.vocabulary.size} tokens")
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.context_size = min(n_ctx or limit, limit)

    def describe(self) -> str:
        return f"transformers {self.path} ({self.device})"

    def sequence(self) -> "TransformersSequence":
        return TransformersSequence(self)

    def _forward(self, tokens: list[int], cache: Any) -> tuple[np.ndarray, Any]:
        """The float32 logits row after `tokens` evaluated on top of `cache`."""
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        self.evaluated_tokens += len(tokens)
        row = out.logits[0, -1, :self.vocabulary.size]
        return row.to(torch.float32).cpu().numpy(), out.past_key_values


class TransformersSequence(Sequence):
    def __init__(self, backend: TransformersBackend):
        super().__init__()
        self.backend = backend
        self.cache: Any = None

    def logits(self, tokens: list[int]) -> np.ndarray:
        if not tokens:
            raise ModelError("cannot evaluate an empty token sequence")
        if len(tokens) > self.backend.context_size:
            raise ContextLimitError(f"{len(tokens)} tokens do not fit the context of "
                                    f"{self.backend.context_size} tokens")
        common = min(common_prefix(self.tokens, tokens), len(tokens) - 1)
        if common == 0:
            self.cache = None
        elif common < len(self.tokens):
            self.cache.crop(common - len(self.tokens))      # negative: how many to drop
        row, self.cache = self.backend._forward(tokens[common:], self.cache)
        self.tokens = list(tokens)
        return row

    def advance(self, token: int) -> np.ndarray:
        if len(self.tokens) >= self.backend.context_size:
            raise ContextLimitError(f"the context of {self.backend.context_size} tokens is full")
        row, self.cache = self.backend._forward([token], self.cache)
        self.tokens.append(token)
        return row

    def fork(self) -> "TransformersSequence":
        child = TransformersSequence(self.backend)
        child.tokens = list(self.tokens)
        child.cache = copy.deepcopy(self.cache)
        return child

    def release(self) -> None:
        self.cache = None
        self.tokens = []
