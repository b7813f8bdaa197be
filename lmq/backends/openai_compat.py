"""`openai:http://HOST:PORT/v1` with `dialect=`: queries on an OpenAI-compatible
`/v1/completions` server, each hole one streamed request with its prompt as token ids.

Engines agree on the OpenAI fields (prompt, max_tokens, stop, temperature, top_p, seed,
logprobs) and differ in how a constraint is sent and how token ids come back; a
`Dialect` per engine says that (as sqlglot keeps its SQL dialects):

| dialect | constraint field | token ids |
| `llama-server` | `grammar` (GBNF) | `logprobs.content[].id` |
| `vllm` | `structured_outputs`: `choice` for an `in` list, else `grammar` (GBNF) | `return_tokens_as_token_ids` |
| `sglang` | `ebnf` (GBNF) | none: the text is tokenized here |

The vLLM and SGLang dialects follow those engines' documented request schemas; they are
not run against the engines in lmq's tests (llama-server's is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmq.backends.llama_server import llama_server_info
from lmq.backends.remote_engine import Generated, RemoteEngineBackend, ServerInfo, pushed_grammar
from lmq.backends.sampling_settings import SamplingSettings
from lmq.constraints.hole_plan import HolePlan
from lmq.errors import ModelError, QueryArgumentError

#: OpenAI's own sampling fields; every other knob is an engine extension
OPENAI_KNOBS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed")


@dataclass(frozen=True)
class Dialect:
    name: str
    #: the request fields that carry a hole's constraint
    constraint: Callable[[HolePlan], dict[str, Any]]
    #: extra knobs the engine takes under its own names (lmq name → engine name)
    knobs: dict[str, str]
    #: request fields asking for token ids and log-probabilities
    token_request: dict[str, Any]
    #: (token ids, log-probabilities) of one streamed choice, or None: tokenize its text
    tokens_of: Callable[[dict[str, Any]], tuple[list[int], list[float]] | None]


def _grammar_field(name: str) -> Callable[[HolePlan], dict[str, Any]]:
    def constraint(plan: HolePlan) -> dict[str, Any]:
        grammar = pushed_grammar(plan)
        return {} if grammar is None else {name: grammar}
    return constraint


def _vllm_constraint(plan: HolePlan) -> dict[str, Any]:
    language = plan.language
    if language is not None and language[0] == "in" and not plan.stops:
        return {"structured_outputs": {"choice": [o.decode("utf-8") for o in language[1]]}}
    grammar = pushed_grammar(plan)
    return {} if grammar is None else {"structured_outputs": {"grammar": grammar}}


def _llama_server_tokens(choice: dict[str, Any]) -> tuple[list[int], list[float]] | None:
    entries = (choice.get("logprobs") or {}).get("content") or []
    return [int(e["id"]) for e in entries], [float(e.get("logprob", 0.0)) for e in entries]


def _vllm_tokens(choice: dict[str, Any]) -> tuple[list[int], list[float]] | None:
    logprobs = choice.get("logprobs") or {}
    names = logprobs.get("tokens") or []
    scores = logprobs.get("token_logprobs") or [0.0] * len(names)
    return [int(n.split(":", 1)[1]) for n in names], [float(s or 0.0) for s in scores]


DIALECTS = {
    "llama-server": Dialect("llama-server", _grammar_field("grammar"),
                            {"top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p",
                             "repeat_penalty": "repeat_penalty", "penalty_last_n": "repeat_last_n",
                             "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
                             "mirostat_eta": "mirostat_eta"},
                            {"logprobs": 1}, _llama_server_tokens),
    "vllm": Dialect("vllm", _vllm_constraint,
                    {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty"},
                    {"logprobs": 1, "return_tokens_as_token_ids": True}, _vllm_tokens),
    "sglang": Dialect("sglang", _grammar_field("ebnf"),
                      {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty"},
                      {"no_stop_trim": True}, lambda choice: None),
}


class OpenAiBackend(RemoteEngineBackend):
    """A model on an OpenAI-compatible completions server, in one engine's dialect."""

    def __init__(self, url: str, *, dialect: str = "llama-server", **kwargs: Any):
        if dialect not in DIALECTS:
            raise QueryArgumentError(f"unknown dialect {dialect!r} of an openai: model "
                                     f"(known: {', '.join(DIALECTS)})")
        self.dialect = DIALECTS[dialect]
        self.engine = f"the OpenAI-compatible {dialect} server"
        super().__init__(url, **kwargs)

    def _server_info(self) -> ServerInfo:
        if self.dialect.name == "llama-server":      # its native /props says more than /models
            return llama_server_info(self, self.model)
        models = self.get_json("/models").get("data") or []
        entry = next((m for m in models if self.model in (None, m.get("id"))), None)
        if entry is None:
            raise ModelError(f"{self.describe()} serves no model {self.model!r} (its /models lists "
                             f"{', '.join(str(m.get('id')) for m in models) or 'none'})")
        if self.model is None:
            self.model = entry.get("id")
        meta = entry.get("meta") or {}
        context = entry.get("max_model_len") or meta.get("n_ctx_train")
        if not isinstance(context, int):
            raise ModelError(f"{self.describe()} does not say the context size of {self.model} "
                             "(max_model_len in /models)")
        path = entry.get("root") if isinstance(entry.get("root"), str) else None
        return ServerInfo(model_path=path, vocab_size=meta.get("n_vocab"), context_size=context,
                          slots=None, chat_template=None)

    def _knobs(self, decoder) -> dict[str, Any]:
        knobs = super()._knobs(decoder)
        neutral = SamplingSettings()
        chosen: dict[str, Any] = {}
        for name, value in knobs.items():
            lmq_name = "penalty_last_n" if name == "repeat_last_n" else name
            if name in OPENAI_KNOBS:
                chosen[name] = value
            elif lmq_name in self.dialect.knobs:
                chosen[self.dialect.knobs[lmq_name]] = value
            elif value != getattr(neutral, lmq_name):
                raise ModelError(f"the sampling argument {lmq_name} is not supported by "
                                 f"{self.describe()}")
        return chosen

    def _request(self, prompt: list[int], plan: HolePlan, budget: int,
                 knobs: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": budget, "stream": True, **knobs,
                                **self.dialect.token_request, **self.dialect.constraint(plan)}
        if self.model is not None:
            body["model"] = self.model
        if plan.stops:
            body["stop"] = [rule.phrase.decode("utf-8") for rule in plan.stops]
        return body

    def _generate(self, body: dict[str, Any], hole: str) -> Generated:
        tokens: list[int] = []
        logprobs: list[float] = []
        text: list[str] = []
        finish = None
        for event in self.post_events("/completions", body, hole):
            for choice in event.get("choices") or ():
                ids = self.dialect.tokens_of(choice)
                if ids is None:
                    text.append(choice.get("text") or "")
                else:
                    tokens += ids[0]
                    logprobs += ids[1]
                finish = choice.get("finish_reason") or finish
            usage = event.get("usage") or {}
            if usage:
                self.count_evaluated(usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        if text:
            tokens = self.tokenize("".join(text))
            logprobs = [0.0] * len(tokens)
        return Generated(tokens, logprobs, finish == "length")
