"""Where-clause IR + evaluated operands → the value language of one hole, as a `ByteDfa`.

Lowering happens in two steps so that compiled automata can be shared: the runtime
evaluates a node's operands in the query's scope and turns the node into a *language
key* (nested tuples of plain values, hashable), and `language_dfa` compiles a key into a
byte automaton, cached per process. The same key met again (a loop, a repeated call)
costs one dictionary lookup.

Keys:

| key | language |
| --- | --- |
| `("in", (b"a", b"b"))` | exactly one of the options |
| `("contains", b"s")` | contains s |
| `("chars", op, n)` | `len(X) op n`, counted in UTF-8 characters |
| `("regex", pattern)` | full match of a Python regex |
| `("and", keys)`, `("or", keys)`, `("not", key)` | intersection, union, complement |

`INT` and `FLOAT` are regex keys of their fixed patterns; `X == v` is `("in", (v,))`,
`X != v` is `("not", ("in", (v,)))`.
"""

from __future__ import annotations

import functools

from lmq.constraints import byte_dfa as fa
from lmq.constraints.byte_dfa import ByteDfa
from lmq.constraints.regex import FLOAT_PATTERN, INT_PATTERN, regex_dfa

LanguageKey = tuple
#: the fixed languages of INT(X) and FLOAT(X) (constraints.md)
TYPE_PATTERNS = {"INT": INT_PATTERN, "FLOAT": FLOAT_PATTERN}
#: their automata, built on first use and then kept for the process: constants of the
#: library like its Unicode tables, not compiled user constraints (`clear_caches` keeps them)
_TYPE_DFAS: dict[str, ByteDfa] = {}


@functools.lru_cache(maxsize=1024)
def language_dfa(key: LanguageKey) -> ByteDfa:
    """The minimal byte automaton of a language key."""
    kind = key[0]
    if kind == "in":
        return fa.options(key[1])
    if kind == "contains":
        return fa.contains(key[1])
    if kind == "chars":
        return fa.char_count(key[1], key[2])
    if kind == "regex":
        return _regex(key[1])
    if kind == "not":
        return fa.complement(language_dfa(key[1]))
    if kind in ("and", "or"):
        combine = fa.intersect if kind == "and" else fa.union
        return functools.reduce(combine, (language_dfa(k) for k in key[1]))
    raise ValueError(f"unknown language key {key!r}")


def _regex(pattern: str) -> ByteDfa:
    if pattern not in TYPE_PATTERNS.values():
        return regex_dfa(pattern)
    dfa = _TYPE_DFAS.get(pattern)
    if dfa is None:
        dfa = _TYPE_DFAS[pattern] = regex_dfa(pattern)
    return dfa


@functools.lru_cache(maxsize=1024)
def value_dfa(key: LanguageKey) -> ByteDfa:
    """The values of a hole under `key`: its language, in well-formed UTF-8 only (a value
    is text; a complement or a length bound alone would also admit broken byte strings)."""
    language = language_dfa(key)
    return language if _only_text(key) else fa.intersect(language, fa.valid_utf8())


def _only_text(key: LanguageKey) -> bool:
    """Whether every string of the key's language is well-formed UTF-8 by construction
    (options and regexes come from Python strings; a complement, a substring or a length
    bound alone admit any bytes)."""
    kind = key[0]
    if kind in ("in", "regex"):
        return True
    if kind == "and":
        return any(_only_text(k) for k in key[1])
    if kind == "or":
        return all(_only_text(k) for k in key[1])
    return False


@functools.lru_cache(maxsize=1024)
def stopped_dfa(key: LanguageKey, stops: tuple[tuple[bytes, bool], ...]) -> ByteDfa:
    """The language of generated streams: `key`'s values, ended by the first stop phrase."""
    return fa.with_stops(value_dfa(key), list(stops)) if stops else value_dfa(key)


#: the key of every text value (what is left of `len(X) < n` once the decoder counts)
ANY_TEXT: LanguageKey = ("chars", ">=", 0)


def character_budget(key: LanguageKey) -> tuple[LanguageKey, int | None]:
    """(the key without its top-level upper bounds on the character count, the most
    characters they allow, or None): `len(X) < n` and `len(X) <= n` in the top-level
    `and` are counted by the decoder, not by n automaton states (see
    `lmq.constraints.char_budget`); a bound inside `or`/`not` stays in the automaton."""
    items = key[1] if key[0] == "and" else (key,)
    limit = None
    rest = []
    for item in items:
        if item[0] == "chars" and item[1] in ("<", "<="):
            bound = item[2] - 1 if item[1] == "<" else item[2]
            limit = bound if limit is None else min(limit, bound)
        else:
            rest.append(item)
    if limit is None:
        return key, None
    return conjunction(rest) or ANY_TEXT, limit


def conjunction(keys: list[LanguageKey]) -> LanguageKey | None:
    """One key for the `and` of several (None for none)."""
    if not keys:
        return None
    return keys[0] if len(keys) == 1 else ("and", tuple(keys))


_CHAR_OPS = frozenset({"<", "<=", "==", "!=", ">", ">="})


def key_to_json(key: LanguageKey) -> list:
    """A language key as JSON (lists and strings; option bytes are UTF-8 text)."""
    kind = key[0]
    if kind == "in":
        return ["in", [o.decode("utf-8") for o in key[1]]]
    if kind == "contains":
        return ["contains", key[1].decode("utf-8")]
    if kind in ("and", "or"):
        return [kind, [key_to_json(k) for k in key[1]]]
    if kind == "not":
        return ["not", key_to_json(key[1])]
    return list(key)


def key_from_json(data: object, depth: int = 0) -> LanguageKey:
    """The language key a JSON form describes, validated (it may come from a network
    client: nothing in it is evaluated, malformed input is a ValueError)."""
    if depth > 32 or not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError("a language is a list [kind, …] (nesting at most 32)")
    kind, rest = data[0], data[1:]
    if kind == "in" and len(rest) == 1 and isinstance(rest[0], list) \
            and all(isinstance(o, str) for o in rest[0]):
        return ("in", tuple(sorted({o.encode("utf-8") for o in rest[0]})))
    if kind == "contains" and len(rest) == 1 and isinstance(rest[0], str):
        return ("contains", rest[0].encode("utf-8"))
    if kind == "regex" and len(rest) == 1 and isinstance(rest[0], str):
        return ("regex", rest[0])
    if kind == "chars" and len(rest) == 2 and rest[0] in _CHAR_OPS and type(rest[1]) is int:
        return ("chars", rest[0], rest[1])
    if kind in ("and", "or") and len(rest) == 1 and isinstance(rest[0], list) and rest[0]:
        return (kind, tuple(key_from_json(k, depth + 1) for k in rest[0]))
    if kind == "not" and len(rest) == 1:
        return ("not", key_from_json(rest[0], depth + 1))
    raise ValueError(f"malformed language {data!r:.80}")


@functools.lru_cache(maxsize=256)
def fewest_value_characters(key: LanguageKey) -> int:
    """The fewest characters of a value of `key`."""
    language = value_dfa(key)
    return int(fa.fewest_characters(language)[language.initial])
