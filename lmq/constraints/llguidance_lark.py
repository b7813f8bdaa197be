"""A checked GBNF grammar in llguidance's Lark dialect (`to_lark`), with exactly
llama.cpp's semantics, and which rules it may read as single lexemes (`choose_lexemes`).

llguidance lexes greedily: once a lexeme has matched, it keeps extending it while it can,
and never backtracks into a shorter match. GBNF has no lexer; a string belongs to the
grammar if any derivation yields it. Lexing every character separately is always exact,
but then llguidance runs its Earley parser on every byte of every token it tries, about
4 ms per mask at 49k tokens. A multi-character lexeme is walked by a lexer DFA instead.

Greedy lexing is exact when the lexemes, taken together, are prefix-free: no string of
any lexeme is a proper prefix of a string of any lexeme. Then the lexer never has a
choice to make (a lexeme that has matched can never be extended by any lexeme), so the
lexeme boundaries of every derivation are the ones it finds. `choose_lexemes` promotes,
from `root` down, each non-recursive, non-empty rule made of characters only, checks the
whole set (single characters included) with a product construction over their NFAs,
and demotes a rule involved in a conflict (its sub-rules become candidates) until none
is left. JSON grammars come out as one or a few lexemes (a JSON value is prefix-free).

The check is first tried the cheap way: the subset construction over the lexemes'
Glushkov automaton (one state per character position, rule references inlined; nearly
deterministic for JSON, so the subsets are mostly single positions). When no subset
holding a final position has a successor, no accepted string continues: the set is
prefix-free. Only when that proof fails does the product construction decide (and pick
the lexeme to demote).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

from lmq.constraints import gbnf as g
from lmq.constraints import limits
from lmq.constraints.regex import merge_ranges

#: candidates larger than this many NFA states stay split (the check is quadratic)
MAX_LEXEME_STATES = 3000
#: pairs explored by one check before giving up on promotion
MAX_PAIRS = 200_000
#: position-list entries the Glushkov proof may build before leaving the check to the
#: product construction (nested bounded repetitions grow their final sets quadratically)
MAX_POSITION_WORK = 100_000

Ranges = tuple[tuple[int, int], ...]


def choose_lexemes(rules: dict[str, g.Node], refs: dict[str, set[str]] | None = None) -> set[str]:
    """Names of the rules to lex as single lexemes (see the module docstring; `refs`:
    `gbnf.references(rules)` if at hand)."""
    refs = refs if refs is not None else g.references(rules)
    nullable = g.nullable_rules(rules, refs)
    candidates = _character_rules(rules, refs, nullable)
    demoted: set[str] = set()
    while True:
        lexemes, singles = _promote(rules, candidates - demoted)
        if not lexemes or _proven_prefix_free(rules, lexemes, singles, nullable):
            return lexemes
        nfa = _Nfa(rules)
        starts = []
        for name in sorted(lexemes):
            start = nfa.build_rule(name)
            if start is None:
                demoted.add(name)
                break
            starts.append((name, start))
        else:
            conflict = nfa.conflict(starts, singles)
            if conflict is None:
                return lexemes
            demoted.add(conflict)


def to_lark(grammar: g.Grammar) -> str:
    """The grammar in llguidance's Lark dialect: the rules `choose_lexemes` picks
    become terminals (lexed greedily, which is exact for them), every other
    character is a lexeme of its own. Rules used inside a lexeme are written once
    more as helper terminals (`H…`), which no rule references."""
    refs = g.references(grammar.rules)
    lexemes = choose_lexemes(grammar.rules, refs)
    rules, helpers = _reachable(grammar.rules, lexemes, refs)
    index = {name: f"{i}_{name.replace('-', '_')}" for i, name in enumerate(grammar.rules)}

    def helper(name: str) -> str:
        return f"H{index[name].upper()}"

    def reference(name: str) -> str:
        return f"T{index[name].upper()}" if name in lexemes else f"r{index[name].lower()}"

    lines = [f"start: {reference('root')}"]
    for name in rules:
        inner = helper if name in lexemes else reference
        lines.append(f"{reference(name)}: {_lark(grammar.rules[name], inner, top=True)}")
    for name in helpers:
        lines.append(f"{helper(name)}: {_lark(grammar.rules[name], helper, top=True)}")
    return "\n".join(lines) + "\n"


def _character_rules(rules: dict[str, g.Node], refs: dict[str, set[str]],
                     nullable: dict[str, bool]) -> set[str]:
    """Rules that reference, transitively, no recursive rule, may not be empty, and
    inline into at most `limits.MAX_GRAMMAR_DEPTH` levels of rules (deeper chains
    would be walked too deep, and they are not worth one lexeme)."""
    refs_of_body = {id(node): refs[name] for name, node in rules.items()}   # a body's refs alike
    closed = {name for name, done in g.fixpoint(
        rules, lambda node, known: all(known[r] for r in refs_of_body[id(node)]), refs).items() if done}
    height: dict[str, int] = {}
    pending = list(closed)
    while pending:                   # each rule after the rules it refers to
        name = pending[-1]
        below = [r for r in refs[name] if r not in height]
        if below:
            pending.extend(below)
            continue
        pending.pop()
        height[name] = 1 + max((height[r] for r in refs[name]), default=0)
    return {name for name in closed
            if not nullable[name] and height[name] <= limits.MAX_GRAMMAR_DEPTH}


def _promote(rules: dict[str, g.Node], candidates: set[str]) -> tuple[set[str], Ranges]:
    """From root down, the topmost candidate rules, and the characters the remaining
    (split) rules read one by one."""
    lexemes: set[str] = set()
    chars: list[tuple[int, int]] = []
    seen: set[str] = set()
    stack = ["root"]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in candidates:
            lexemes.add(name)
            continue
        for node in g.nodes_of(rules[name]):
            if isinstance(node, g.RuleRef):
                stack.append(node.name)
            elif isinstance(node, g.Literal):
                chars.extend((ord(c), ord(c)) for c in node.text)
            elif isinstance(node, (g.CharClass, g.AnyChar)):
                chars.extend(g.code_point_ranges(node))
    return lexemes, merge_ranges(chars)


class _TooLarge(Exception):
    pass


class _Glushkov:
    """The Glushkov automaton of several lexemes: a position per character (class) read,
    with the positions that may follow it. `states` counts the NFA states `_Nfa` would
    create for the current lexeme, so that its size limit applies alike."""

    def __init__(self, rules: dict[str, g.Node]):
        self.rules = rules
        self.ranges: list[Ranges] = []
        self.follow: list[list[int]] = []
        self.states = 0
        self.work = 0
        self.built: dict[int, tuple] = {}

    def position(self, ranges: Ranges) -> int:
        self.ranges.append(ranges)
        self.follow.append([])
        return len(self.ranges) - 1

    def link(self, last: list[int], first: list[int]) -> None:
        if first:
            self.work += len(last) * len(first)
            if self.work > MAX_POSITION_WORK:
                raise _TooLarge
            follow = self.follow
            for p in last:
                follow[p].extend(first)

    def shared(self, node: g.Node) -> tuple[list[int], list[int], bool]:
        """`node(node)` for a node built many times (a rule's body, a repeated item):
        after its first build, copied from it, shifted. Only its final positions gain
        successors after it is built (from what follows it), so their count then is
        all a copy needs to keep."""
        if self.states > MAX_LEXEME_STATES:
            raise _TooLarge                    # as `_Nfa.build_rule` will find
        built = self.built.get(id(node))
        if built is None:
            start, states, work = len(self.ranges), self.states, self.work
            first, last, nullable = self.node(node)
            self.built[id(node)] = (start, len(self.ranges), first, last, nullable,
                                    {p: len(self.follow[p]) for p in last},
                                    self.states - states, self.work - work)
            return first, last, nullable
        start, end, first, last, nullable, inner, states, work = built
        shift = len(self.ranges) - start
        self.states += states
        self.work += work + end - start
        if self.work > MAX_POSITION_WORK:
            raise _TooLarge
        self.ranges += self.ranges[start:end]
        self.follow += [[q + shift for q in follow] for follow in self.follow[start:end]]
        for p, count in inner.items():
            del self.follow[p + shift][count:]
        return [p + shift for p in first], [p + shift for p in last], nullable

    def node(self, node: g.Node) -> tuple[list[int], list[int], bool]:
        """(first positions, final positions, nullable) of `node`."""
        if isinstance(node, g.RuleRef):
            return self.shared(self.rules[node.name])
        if isinstance(node, (g.CharClass, g.AnyChar)):
            p = self.position(g.code_point_ranges(node))
            return [p], [p], False
        if isinstance(node, g.Literal):
            if not node.text:
                return [], [], True
            self.states += len(node.text) - 1
            chain = [self.position(((ord(c), ord(c)),)) for c in node.text]
            for p, q in zip(chain, chain[1:]):
                self.follow[p].append(q)
            return chain[:1], chain[-1:], False
        if isinstance(node, g.Sequence):
            self.states += max(len(node.items) - 1, 0)
            return self.sequence([self.node(item) for item in node.items])
        if isinstance(node, g.Choice):
            first, last, nullable = [], [], False
            for item in node.alternatives:
                f, l, n = self.node(item)
                first += f
                last += l
                nullable = nullable or n
            return first, last, nullable
        return self.repeat(node)

    def sequence(self, parts: list[tuple[list[int], list[int], bool]]) -> tuple[list[int], list[int], bool]:
        first: list[int] = []
        last: list[int] = []
        nullable = True
        for f, l, n in parts:
            self.link(last, f)
            if nullable:
                first = first + f
            last = last + l if n else l
            nullable = nullable and n
            self.work += len(last)
        return first, last, nullable

    def repeat(self, node: g.Repeat) -> tuple[list[int], list[int], bool]:
        """x{low,high} as low copies of x and (x (x …)?)? nested optional copies, as
        `_Nfa.repeat` builds it; x{low,} as low copies and a looping one."""
        if self.states > MAX_LEXEME_STATES:
            raise _TooLarge
        parts = [self.shared(node.item) for _ in range(node.low)]
        if node.high is None:
            self.states += node.low + 2
            first, last, _ = self.shared(node.item)
            self.link(last, first)
            parts.append((first, last, True))
            return self.sequence(parts)
        self.states += node.high
        optional: tuple[list[int], list[int], bool] = ([], [], True)
        for _ in range(node.high - node.low):
            first, last, nullable = self.shared(node.item)
            self.link(last, optional[0])
            optional = (first + optional[0] if nullable else first, last + optional[1], True)
            self.work += len(optional[1])
        return self.sequence(parts + [optional])


def _proven_prefix_free(rules: dict[str, g.Node], lexemes: set[str], singles: Ranges,
                        nullable: dict[str, bool]) -> bool:
    """Whether the lexemes and single characters are prefix-free together, by the subset
    construction over their Glushkov automaton (see the module docstring); False when the
    proof does not apply (the product construction then decides), or a lexeme is too
    large to promote. A single character that may start a lexeme refuses the proof at
    once, as it fails the product construction's first test (which refuses an equal
    one-character lexeme too)."""
    if any(_intersect(ranges, singles) for name in lexemes
           for ranges in _first_ranges(g.RuleRef(name), rules, nullable)):
        return False
    automaton = _Glushkov(rules)
    heads: list[int] = []
    final: set[int] = set()
    try:
        for name in sorted(lexemes):
            automaton.states = 2
            first, last, _ = automaton.node(g.RuleRef(name))
            if automaton.states > MAX_LEXEME_STATES:
                return False
            heads += first
            final.update(last)
    except _TooLarge:
        return False
    # Every single position is checked (unreachable ones too: a refusal only costs the
    # product construction); the subsets of several positions are explored from where a
    # character leads to several, until they part into single ones again.
    successors = _Successors(automaton.ranges)
    follow = automaton.follow
    pending = [subset for subset in successors(heads) if len(subset) > 1]
    for p, targets in enumerate(follow):
        if targets:
            if p in final:
                return False           # an accepted string continues
            if len(targets) > 1 and not successors.disjoint(targets):
                pending += [subset for subset in successors(targets) if len(subset) > 1]
    seen = set(pending)
    while pending:
        subset = pending.pop()
        targets = list(dict.fromkeys(q for p in subset for q in follow[p]))
        if not targets:
            continue
        if not final.isdisjoint(subset):
            return False
        for successor in successors(targets):
            if len(successor) > 1 and successor not in seen:
                if len(seen) > MAX_LEXEME_STATES:
                    return False
                seen.add(successor)
                pending.append(successor)
    return True


def _first_ranges(node: g.Node, rules: dict[str, g.Node], nullable: dict[str, bool]) -> list[Ranges]:
    """The character ranges a string of `node` may start with (rules inlined)."""
    if isinstance(node, g.RuleRef):
        return _first_ranges(rules[node.name], rules, nullable)
    if isinstance(node, (g.CharClass, g.AnyChar)):
        return [g.code_point_ranges(node)]
    if isinstance(node, g.Literal):
        return [((ord(node.text[0]), ord(node.text[0])),)] if node.text else []
    if isinstance(node, g.Repeat):
        return _first_ranges(node.item, rules, nullable) if node.high != 0 else []
    if isinstance(node, g.Choice):
        return [r for item in node.alternatives for r in _first_ranges(item, rules, nullable)]
    found: list[Ranges] = []
    for item in node.items:
        found += _first_ranges(item, rules, nullable)
        if not g.derives_empty(item, nullable):
            break
    return found


class _Successors:
    """The sets of positions one character leads to from a set of `targets` (their
    successors): each target alone when their ranges are disjoint (as in most states of
    a JSON grammar; decided once per combination of ranges, which copies of a rule
    share), else one set per piece of the ranges' common refinement."""

    def __init__(self, ranges: list[Ranges]):
        self.ranges = ranges
        self.identity = list(map(id, ranges))
        self.known: dict[tuple[int, ...], bool] = {}

    def disjoint(self, targets: list[int]) -> bool:
        key = tuple(map(self.identity.__getitem__, targets))
        disjoint = self.known.get(key)
        if disjoint is None:
            pieces = sorted(piece for q in dict.fromkeys(targets) for piece in self.ranges[q])
            disjoint = self.known[key] = all(pieces[i][1] < pieces[i + 1][0]
                                             for i in range(len(pieces) - 1))
        return disjoint

    def __call__(self, targets: list[int]) -> list[tuple[int, ...]]:
        targets = list(dict.fromkeys(targets))
        if len(targets) == 1 or self.disjoint(targets):
            return [(q,) for q in targets]
        ranges = self.ranges
        pieces = [(low, high, q) for q in targets for low, high in ranges[q]]
        cuts = sorted({low for low, _, _ in pieces} | {high + 1 for _, high, _ in pieces})
        found: dict[tuple[int, ...], None] = {}
        for low, high in zip(cuts, cuts[1:]):
            covering = tuple(sorted({q for a, b, q in pieces if a <= low and high - 1 <= b}))
            if covering:
                found[covering] = None
        return list(found)


def _intersect(a: Ranges, b: Ranges) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] < b[j][0]:
            i += 1
        elif b[j][1] < a[i][0]:
            j += 1
        else:
            return True
    return False


class _Nfa(g.GrammarNfa):
    """Thompson NFA over code point ranges of several lexemes (rule refs inlined)."""

    def __init__(self, rules: dict[str, g.Node]):
        super().__init__(rules)
        self.edges: list[list[tuple[Ranges, int]]] = []
        self.final: dict[int, str] = {}
        self.owner: list[str] = []
        self.limit = 0

    def state(self) -> int:
        if len(self.epsilon) >= self.limit:
            raise _TooLarge
        self.epsilon.append([])
        self.edges.append([])
        self.owner.append(self.current)
        return len(self.epsilon) - 1

    def character(self, ranges: Ranges, start: int, end: int) -> None:
        self.edges[start].append((ranges, end))

    def build_rule(self, name: str) -> int | None:
        """Start state of the lexeme `name`, or None when it is too large to check."""
        self.current = name
        self.limit = len(self.epsilon) + MAX_LEXEME_STATES
        try:
            start, end = self.state(), self.state()
            self.fragment(g.RuleRef(name), start, end)
        except _TooLarge:
            return None
        self.final[end] = name
        return start

    def closure(self, state: int, cache: dict[int, frozenset[int]]) -> frozenset[int]:
        found = cache.get(state)
        if found is None:
            seen, stack = {state}, [state]
            while stack:
                for target in self.epsilon[stack.pop()]:
                    if target not in seen:
                        seen.add(target)
                        stack.append(target)
            found = cache[state] = frozenset(seen)
        return found

    def conflict(self, starts: list[tuple[str, int]], singles: Ranges) -> str | None:
        """A lexeme some string of which extends a string of another (or the same)
        lexeme or a single character; None when the lexemes are prefix-free together."""
        owner = self.owner
        cache: dict[int, frozenset[int]] = {}
        continues = [bool(edges) for edges in self.edges]
        # a single character that starts a lexeme is a proper prefix of it
        for name, start in starts:
            if any(_intersect(ranges, singles) for state in self.closure(start, cache)
                   for ranges, _ in self.edges[state]):
                return name
        heads = [state for _, start in starts for state in self.closure(start, cache)]
        queue = deque()
        seen: set[tuple[int, int]] = set()

        def step(left: Iterable[int], right: Iterable[int]) -> None:
            right = list(right)
            for a in left:
                for ranges_a, target_a in self.edges[a]:
                    for b in right:
                        for ranges_b, target_b in self.edges[b]:
                            pair = (target_a, target_b)
                            if pair not in seen and _intersect(ranges_a, ranges_b):
                                seen.add(pair)
                                queue.append(pair)

        step(heads, heads)
        while queue:
            if len(seen) > MAX_PAIRS:
                return max((name for name, _ in starts), key=owner.count)
            a, b = queue.popleft()
            left, right = self.closure(a, cache), self.closure(b, cache)
            if any(state in self.final for state in left) and any(continues[state] for state in right):
                return owner[b]
            step(left, right)
        return None


def _reachable(rules: dict[str, g.Node], lexemes: set[str],
               refs: dict[str, set[str]]) -> tuple[list[str], list[str]]:
    """The rules reachable from root without entering a lexeme (lexemes included), and
    the rules used inside lexemes, each in order of definition."""

    def references(name: str) -> list[str]:
        return list(refs[name])

    outer, inner = set(), set()
    stack = ["root"]
    while stack:
        name = stack.pop()
        if name not in outer:
            outer.add(name)
            if name in lexemes:
                pending = references(name)
                while pending:
                    sub = pending.pop()
                    if sub not in inner:
                        inner.add(sub)
                        pending.extend(references(sub))
            else:
                stack.extend(references(name))
    return [n for n in rules if n in outer], [n for n in rules if n in inner]


def _lark(node: g.Node, reference, top: bool = False) -> str:
    """Lark text of `node`; `reference(name)` renders a rule reference."""
    if isinstance(node, g.Literal):
        if not node.text:
            return '""'
        text = " ".join(_lark_char(ord(c)) for c in node.text)
        return text if len(node.text) == 1 or top else f"({text})"
    if isinstance(node, g.CharClass):
        body = "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in node.ranges)
        return f"/[{'^' if node.negated else ''}{body}]/"
    if isinstance(node, g.AnyChar):
        return "/(?s:.)/"
    if isinstance(node, g.RuleRef):
        return reference(node.name)
    if isinstance(node, g.Repeat):
        if node.high == 0:
            return '""'
        inner = _lark(node.item, reference)
        if isinstance(node.item, g.Repeat):          # a repetition of a repetition
            inner = f"({inner})"
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((node.low, node.high))
        if suffix is None:
            suffix = f"{{{node.low},{'' if node.high is None else node.high}}}"
        return inner + suffix
    if isinstance(node, g.Sequence):
        if not node.items:
            return '""'
        text = " ".join(_lark(item, reference) for item in node.items)
        return text if top else f"({text})"
    text = " | ".join(_lark(item, reference, top=True) for item in node.alternatives)
    return text if top else f"({text})"


def _lark_char(code: int) -> str:
    c = chr(code)
    if 0x20 <= code < 0x7F and c not in '"\\/':
        return f'"{c}"'
    return f"/\\x{{{code:x}}}/"
