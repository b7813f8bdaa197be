"""The language and the stop/budget constraints on the random backend, over many seeds."""

import asyncio

import pytest

import lmq
from lmq.compiler.codegen import compile_query

SEEDS = range(150)


def rand(seed=0, **kw):
    return lmq.model("random", seed=seed, **kw)


@pytest.mark.parametrize("op,bound,ok", [("<", 4, lambda n: n <= 3), ("<=", 4, lambda n: n <= 4),
                                         ("==", 5, lambda n: n == 5), (">", 3, lambda n: 4 <= n <= 7),
                                         (">=", 2, lambda n: 2 <= n <= 7)])
def test_token_bounds_hold_for_every_seed(op, bound, ok):
    query = f'"Start:[X]" where len(TOKENS(X)) {op} {bound} and len(TOKENS(X)) < 8'
    for seed in SEEDS:
        result = lmq.run_sync(query, model=rand(seed, end_probability=0.3))
        assert ok(len(result.tokens["X"])), (seed, result.tokens)


@pytest.mark.parametrize("phrase", ["e", "e ", "in", ", t"])
def test_stops_at_ends_at_first_occurrence_for_every_seed(phrase):
    query = f'"Text:[X]" where STOPS_AT(X, {phrase!r}) and len(TOKENS(X)) < 40'
    stopped = 0
    for seed in SEEDS:
        result = lmq.run_sync(query, model=rand(seed))
        value = result.variables["X"]
        if value.endswith(phrase):
            stopped += 1
            assert value.find(phrase) == len(value) - len(phrase), (seed, value)
        else:
            assert phrase not in value and len(result.tokens["X"]) == 39, (seed, value)
        assert result.prompt == "Text:" + value
    assert stopped > 0


def test_stop_phrase_straddling_tokens_is_cut_from_value_and_prompt():
    query = '"Text:[X] after" where STOPS_BEFORE(X, "e t") and len(TOKENS(X)) < 60'
    straddled = 0
    table = rand().backend().vocabulary.token_bytes
    for seed in range(300):
        result = lmq.run_sync(query, model=rand(seed))
        value = result.variables["X"]
        assert "e t" not in value
        assert result.prompt == "Text:" + value + " after"
        raw = b"".join(table[t] for t in result.tokens["X"])
        if b"e t" in raw and not raw.endswith(b"e t"):
            straddled += 1
    assert straddled > 0


def test_unsatisfiable_bounds_name_the_variable():
    with pytest.raises(lmq.UnsatisfiableConstraint, match="X"):
        lmq.run_sync('"[X]" where len(TOKENS(X)) > 5 and len(TOKENS(X)) < 3', model=rand())


def test_two_holes_evaluate_each_prompt_token_once(pinned_model):
    backend = rand(3).backend()
    result = lmq.run_sync('"First:[A] and then, second:[B]. End." where len(TOKENS(A)) < 5 and '
                          'len(TOKENS(B)) < 5', model=pinned_model(backend))
    prompt_tokens = backend.tokenize("First:") + result.tokens["A"] + \
        backend.tokenize(" and then, second:") + result.tokens["B"]
    # each token evaluated once; the very last generated token is never fed back
    assert backend.evaluated_tokens == len(prompt_tokens) - 1


def test_program_form_constructs():
    query = '''
import math
items = []
for i in range(3):
    if i == 1:
        continue
    "- [ITEM]\\n" where len(TOKENS(ITEM)) < 3
    items.append(ITEM)
n = 0
while True:
    n += 1
    if n > 2:
        break
try:
    raise ValueError("x")
except ValueError:
    "caught "
def helper(x):
    return x * 2
class Box:
    size = 4
with open(__file__ if False else "/dev/null") as f:
    pass
assert math.pi > 3
# a comment
return (len(items), helper(Box.size), n)
'''
    assert lmq.run_sync(query, model=rand()) == (2, 8, 3)


def test_string_forms_escapes_and_interpolation():
    query = ('"a\\tb" \'c\' r"\\n"\n"""x\n\ny"""\n"{v:>4}|{v!r}|[[lit]]|{{brace}}|{await_me()}"\n')

    async def await_me():
        return "awaited"

    result = lmq.run_sync(query, v="z", await_me=await_me)
    assert result.prompt == 'a\tbc\\nx\n\ny   z|\'z\'|[lit]|{brace}|awaited'


def test_interpolated_text_never_opens_a_hole():
    result = lmq.run_sync('"{text}"', text="[NOT_A_HOLE]")
    assert result.prompt == "[NOT_A_HOLE]" and result.variables == {}


def test_clause_form_and_one_line_form():
    program = compile_query('argmax(max_len=64)\n    "Hi [WHO]"\nFROM\n    "random"\nWhere\n'
                            '    len(TOKENS(WHO)) < 3\ndistribution\n    WHO in [" a", " b"]\n')
    assert program.decoder.name == "argmax" and program.model.source == '"random"'
    assert program.distribution.variable == "WHO"
    result = lmq.run_sync('argmax "Hi [WHO]" from "random" where len(TOKENS(WHO)) < 3')
    assert len(result.tokens["WHO"]) <= 2


def test_decoder_names_are_ordinary_names_in_program_form():
    assert lmq.run_sync('sample = 2\nwhere = 3\nreturn sample + where') == 5


def test_global_and_inline_where_are_conjoined():
    query = 'argmax\n    "[A]" where len(TOKENS(A)) > 3\nwhere\n    len(TOKENS(A)) < 6\n'
    for seed in range(30):
        assert 4 <= len(lmq.run_sync(query, model=rand(seed, end_probability=0.5)).tokens["A"]) <= 5


def test_parameters_bind_in_order_of_first_use_and_missing_ones_are_named():
    query = lmq.query('"{zeta} then {alpha}"\nreturn (zeta, alpha)')
    assert query(1, 2) == (1, 2)
    with pytest.raises(lmq.QueryArgumentError, match="alpha"):
        lmq.query('"{zeta} {alpha} [X]"')(1, model="local:llama.cpp:/no/model.gguf")
    with pytest.raises(lmq.QueryArgumentError, match="bogus"):
        query(1, 2, bogus=3)


def test_query_without_holes_never_loads_a_model():
    assert lmq.run_sync('"no holes"', model="local:llama.cpp:/no/model.gguf").prompt == "no holes"


def test_decorators_sync_async_and_F():
    @lmq.query(model=rand(1))
    def sync_query(topic):
        '''lmq
        "About {topic}:[X]" where len(TOKENS(X)) < 3
        return X
        '''

    @lmq.query(model=rand(1))
    async def async_query(topic):
        '''lmq
        "About {topic}:[X]" where len(TOKENS(X)) < 3
        return X
        '''

    assert sync_query("cats") == asyncio.run(async_query("cats"))
    one = lmq.F("Say [X]", "len(TOKENS(X)) < 3", model=rand(2))
    two = lmq.F("[A] and [B]", "len(TOKENS(A)) < 2 and len(TOKENS(B)) < 2", model=rand(2))
    assert isinstance(one(), str) and set(two()) == {"A", "B"}


def test_sync_call_inside_event_loop_says_await():
    async def inside():
        lmq.run_sync('"x"')

    with pytest.raises(lmq.LmqError, match="await"):
        asyncio.run(inside())


def test_variable_decorator_and_python_check():
    result = lmq.run_sync('"[@str.upper X]" where len(TOKENS(X)) < 4', model=rand())
    assert result.variables["X"] == result.variables["X"].upper()
    with pytest.raises(lmq.ConstraintViolation, match="startswith"):
        lmq.run_sync('"[X]" where len(TOKENS(X)) < 3 and X.startswith("never-ever")', model=rand())


def test_nested_query_return_replaces_text_and_macro_keeps_it():
    @lmq.query
    def returns(prefix):
        '''lmq
        "{prefix}[Y]" where len(TOKENS(Y)) < 3
        return "VALUE"
        '''

    @lmq.query
    def macro():
        '''lmq
        "macro text"
        '''

    result = lmq.run_sync('"A[X: returns(\'p:\')] B[M: macro]"', model=rand())
    assert result.prompt == "AVALUE Bmacro text"
    assert result.variables == {"X": "VALUE", "M": "macro text"}


def test_chat_tags_use_the_template():
    result = lmq.run_sync('"{:user}hi{:assistant}[R]" where len(TOKENS(R)) < 3', model=rand())
    assert result.prompt.startswith("<|im_start|>system")
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in result.prompt


def test_generated_program_keeps_query_line_numbers():
    source = '"a"\nx = 1\n"""multi\nline"""\ny = 1 / 0\n'
    program = compile_query(source)
    assert program.python.count("\n") == source.count("\n")
    with pytest.raises(ZeroDivisionError) as info:
        lmq.run_sync(source)
    assert info.traceback[-1].lineno + 1 == 5
    assert compile_query(source) is program
