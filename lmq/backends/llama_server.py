"""`llama-server:http://HOST:PORT`: queries on llama.cpp's llama-server, each hole one
streamed `/completion` request.

The request carries the prompt as token ids (`cache_prompt` keeps the slot's KV cache, so
the holes of a query evaluate their common prefix once), the hole's stream language as
GBNF (`grammar`), its stop phrases (`stop`), its token budget (`n_predict`), every
sampling knob under llama.cpp's name, `seed`, and `n_probs: 1` for each generated token's
id and log-probability (the model's, before grammar and samplers: llama-server reports no
masked distribution). Vocabulary size, context, slots, chat template and the GGUF path
come from `/props` and `/v1/models`.
"""

from __future__ import annotations

from typing import Any

from lmq.backends.remote_engine import Generated, RemoteEngineBackend, ServerInfo, pushed_grammar
from lmq.constraints.hole_plan import HolePlan
from lmq.errors import ModelError


def llama_server_info(backend: RemoteEngineBackend, model: str | None) -> ServerInfo:
    """What llama-server's `/props` and `/v1/models` (at the server's root) say about the
    model: its GGUF path, vocabulary size, per-slot context, slots and chat template."""
    props = backend.get_json("/props", at_root=True)
    settings = props.get("default_generation_settings") or {}
    context = settings.get("n_ctx") or props.get("n_ctx")
    if not isinstance(context, int):
        raise ModelError(f"{backend.describe()} did not say its context size in /props: is it "
                         "llama-server?")
    vocab_size = None
    for entry in (backend.get_json("/v1/models", at_root=True).get("data") or []):
        meta = entry.get("meta") or {}
        if model in (None, entry.get("id")) and isinstance(meta.get("n_vocab"), int):
            vocab_size = meta["n_vocab"]
            break
    return ServerInfo(model_path=props.get("model_path"), vocab_size=vocab_size,
                      context_size=context, slots=props.get("total_slots"),
                      chat_template=props.get("chat_template") or None)


class LlamaServerBackend(RemoteEngineBackend):
    """A model served by llama.cpp's llama-server."""

    engine = "llama-server"

    def _server_info(self) -> ServerInfo:
        return llama_server_info(self, self.model)

    def _request(self, prompt: list[int], plan: HolePlan, budget: int,
                 knobs: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "n_predict": budget, "stream": True,
                                "cache_prompt": True, "n_probs": 1, "return_tokens": True,
                                **knobs}
        grammar = pushed_grammar(plan)
        if grammar is not None:
            body["grammar"] = grammar
        if plan.stops:
            body["stop"] = [rule.phrase.decode("utf-8") for rule in plan.stops]
        if self.model is not None:
            body["model"] = self.model
        return body

    def _generate(self, body: dict[str, Any], hole: str) -> Generated:
        tokens: list[int] = []
        logprobs: list[float] = []
        at_budget = False
        for event in self.post_events("/completion", body, hole):
            probabilities = event.get("completion_probabilities") or ()
            for index, token in enumerate(event.get("tokens") or ()):
                tokens.append(int(token))
                entry = probabilities[index] if index < len(probabilities) else {}
                logprobs.append(float(entry.get("logprob", 0.0)))
            if event.get("stop"):
                at_budget = event.get("stop_type") == "limit"
                timings = event.get("timings") or {}
                self.count_evaluated(timings.get("prompt_n", 0) + timings.get("predicted_n", 0))
        return Generated(tokens, logprobs, at_budget)
