"""lmq: LMQL's query language on local models, with exact token constraints.

Pipeline: `lmq.compiler` (query text → prompt program + constraint IR) → `lmq.runtime`
(interpreter, decoders, hole plans) → `lmq.backends` (llama.cpp, random). See
docs/architecture.md.
"""

from lmq.api import F, model, query, run, run_sync
from lmq.errors import (ConstraintError, ConstraintTooLarge, ConstraintViolation, ContextLimitError,
                        LmqError, LmqSyntaxError, ModelError, QueryArgumentError,
                        UnsatisfiableConstraint)
from lmq.runtime.decorators import pre, streaming
from lmq.runtime.query import Model, QueryFunction
from lmq.runtime.result import LMQResult

__version__ = "0.1.0"

__all__ = ["F", "LMQResult", "Model", "QueryFunction", "model", "pre", "query", "run", "run_sync",
           "streaming",
           "ConstraintError", "ConstraintTooLarge", "ConstraintViolation", "ContextLimitError", "LmqError",
           "LmqSyntaxError", "ModelError", "QueryArgumentError", "UnsatisfiableConstraint"]
