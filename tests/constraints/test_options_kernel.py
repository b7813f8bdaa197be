"""The compiled route of option lists (`_kernel_options.h`, through `byte_dfa.options`):
the identical `ByteDfa` the Python route builds (state numbering, tables, byte classes,
accepting states); an option trie past its bound is left to Python, which names it."""

from __future__ import annotations

import random
from contextlib import nullcontext

import pytest

from lmq.constraints import byte_dfa as fa
from lmq.constraints import limits, token_choice
from lmq.errors import ConstraintTooLarge
from test_gbnf_dfa_kernel import assert_same_automaton

needs_kernel = pytest.mark.skipif(not token_choice.KERNEL_BUILT,
                                  reason="checked by test_the_kernel_is_built_in_this_install")

NAMED = {
    "one option": [b"yes"],
    "the empty option alone": [b""],
    "the empty option and others": [b"", b"a", b"ab"],
    "a prefix of another": [b"no", b"nope", b"yes"],
    "shared suffixes": [b"red fish", b"blue fish", b"one fish", b"two fish", b"fish"],
    "UTF-8": ["née".encode(), "naïve".encode(), "😀".encode(), "é€".encode()],
    "every byte apart (257 classes)": [bytes([b, b]) for b in range(256)],
    "every byte alike": [bytes([b]) for b in range(256)],
    "long options": [(f"option {i} " * 20).encode() for i in range(30)],
}


def _both(items: list[bytes]) -> tuple[fa.ByteDfa, fa.ByteDfa]:
    """(the kernel's automaton, the Python route's)."""
    compiled = fa.options(items)
    with token_choice.numpy_fallback():
        return compiled, fa.options(items)


@needs_kernel
@pytest.mark.parametrize("name", list(NAMED))
def test_the_kernel_builds_the_python_routes_automaton(name):
    from lmq.constraints import _kernel
    words = sorted(set(NAMED[name]))
    assert _kernel.options_dfa(words, fa.OPTION_NODES_PER_STATE * limits.MAX_STATES) is not NotImplemented
    assert_same_automaton(*_both(NAMED[name]))


@needs_kernel
def test_random_option_lists_get_the_same_automaton_from_both_routes():
    rng = random.Random(5)
    for _ in range(400):
        alphabet = rng.choice([b"ab", b"abc", "a bé".encode(), bytes(range(256))])
        items = [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.5:
            suffix = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            items = [item + suffix for item in items]
        assert_same_automaton(*_both(items))


@needs_kernel
def test_a_trie_past_its_bound_is_left_to_python_which_names_it(monkeypatch):
    from lmq.constraints import _kernel
    monkeypatch.setattr(limits, "MAX_STATES", 10)
    items = [f"{i} option".encode() for i in range(20)]
    assert _kernel.options_dfa(sorted(items), fa.OPTION_NODES_PER_STATE * limits.MAX_STATES) is NotImplemented
    messages = []
    for fallback in (False, True):
        with token_choice.numpy_fallback() if fallback else nullcontext():
            with pytest.raises(ConstraintTooLarge) as error:
                fa.options(items)
            messages.append(str(error.value))
    assert messages[0] == messages[1] and "trie nodes" in messages[0]
