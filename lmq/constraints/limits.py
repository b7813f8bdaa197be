"""How large a constraint may grow before lmq refuses it (`ConstraintTooLarge`), so a
pathological constraint answers at once instead of eating the machine.

Each limit is a module attribute, read when a constraint is compiled; its default comes
from an environment variable when set: `LMQ_MAX_STATES` (states of one automaton: a
regex's NFA and DFA, products, `len(X)` counters), `LMQ_MAX_GRAMMAR_RULES` and
`LMQ_MAX_GRAMMAR_DEPTH` (a GBNF grammar's rules and nesting). The defaults keep any
single compilation under about a second on a 2-core machine and a few hundred MB.
"""

from __future__ import annotations

import os

from lmq.errors import ConstraintError, ConstraintTooLarge


def _setting(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConstraintError(f"${name} must be an integer, not {text!r}") from None
    return max(value, 1)


#: states of one automaton (a regex's NFA, any DFA, a product)
MAX_STATES = _setting("LMQ_MAX_STATES", 20_000)
#: rules of one GBNF grammar
MAX_GRAMMAR_RULES = _setting("LMQ_MAX_GRAMMAR_RULES", 1_000)
#: nesting of a GBNF grammar's groups; also how deep a chain of rules is inlined into
#: one lexeme for llguidance (deeper chains stay rules)
MAX_GRAMMAR_DEPTH = _setting("LMQ_MAX_GRAMMAR_DEPTH", 100)


def too_many_states(what: str, grown: str = "") -> ConstraintTooLarge:
    """The error for an automaton that grows past `MAX_STATES` (`grown`: how far it got,
    when that is measured otherwise, as in the nodes of an option trie)."""
    grown = grown or f"{MAX_STATES:,} automaton states"
    return ConstraintTooLarge(f"constraint too large: {what} grows past {grown}; the limit is "
                              f"{MAX_STATES:,} states (set $LMQ_MAX_STATES or "
                              f"lmq.constraints.limits.MAX_STATES to raise it)")
