"""The constraint engine: what a hole's value may be, as a token mask per step.

Byte automata, regexes, GBNF grammars, JSON schemas and the llguidance bridge compile a
hole's constraints; the vocabulary index, token masks, grammar masks and budgets turn
them into a `TokenAutomaton` over one vocabulary; `HolePlan` is the whole constraint
program of a hole and its wire form. `token_choice` applies a step's mask to a logits row
and picks or draws the token (exported here: the decoder, the sampler, the server and the
bench all go through it). The package depends on `lmq.errors` and the vocabulary
(lmq/backends/base.py) only; lowering a where clause into a plan is the runtime's
(lmq/runtime/hole.py).
"""

from lmq.constraints.token_choice import (best, candidates, choose, draw, draw_rows,
                                          log_normalizer)

__all__ = ["best", "candidates", "choose", "draw", "draw_rows", "log_normalizer"]
