"""Every construct of the query language (spec/language.md) and the Python API around it,
run on the seeded random backend. Expected texts are built from the values the run
produced, never hard-coded model outputs."""

import asyncio
import traceback

import pytest

import lmq
from lmq.compiler.codegen import compile_query
from vocab_paths import vocab

NO_MODEL = "local:llama.cpp:/nonexistent/model.gguf"
GPT2_VOCAB = vocab("gpt-2")    # a GGUF without a chat template


def token_text(model, tokens):
    return model.backend().detokenize(tokens).decode("utf-8", "replace")


# --- the two forms of a query -------------------------------------------------------------

def test_program_form_return_and_result_object(random_model):
    body = ('"Q: What is the capital of France?\\n"\n'
            '"A:[ANSWER]" where STOPS_AT(ANSWER, ".") and len(TOKENS(ANSWER)) < 20\n')
    for seed in range(5):
        result = lmq.run_sync(body, model=random_model(seed))
        answer = result.variables["ANSWER"]
        assert isinstance(result, lmq.LMQResult)
        assert result.prompt == "Q: What is the capital of France?\nA:" + answer
        assert set(result.tokens) == {"ANSWER"} and 0 < len(result.tokens["ANSWER"]) < 20
        assert isinstance(result.logprob, float)
        # the same seed draws the same tokens: `return` changes only what the call returns
        returned = lmq.run_sync(body + "return ANSWER.strip()\n", model=random_model(seed))
        assert returned == answer.strip()
        bare = lmq.run_sync(body + "return\n", model=random_model(seed))
        assert isinstance(bare, lmq.LMQResult) and bare.prompt == result.prompt


CLAUSE_QUERY = '''argmax(max_len=512)
    "Review: {review}\\n"
    "Sentiment:[CLS]"
from
    "random"
where
    len(TOKENS(CLS)) < 5
distribution
    CLS in [" positive", " negative"]
'''


def test_clause_form_carries_every_clause():
    program = compile_query(CLAUSE_QUERY)
    assert program.decoder.name == "argmax"
    assert program.decoder.arguments.evaluate({}) == {"max_len": 512}
    assert program.model.evaluate({}) == "random"
    assert program.distribution.variable == "CLS"
    assert program.distribution.op == "in"
    assert program.distribution.operand.evaluate({}) == [" positive", " negative"]
    assert program.free_names == ("review",)
    assert [h.name for h in program.holes] == ["CLS"]
    result = lmq.run_sync(CLAUSE_QUERY, review="great")
    assert [value for value, _ in result.variables["P(CLS)"]] == [" positive", " negative"]


def test_clause_form_runs_with_its_from_and_where_clauses(random_model):
    query = CLAUSE_QUERY.split("distribution")[0]
    result = lmq.run_sync(query, review="great")          # the model comes from `from`
    value = result.variables["CLS"]
    assert result.prompt == "Review: great\nSentiment:" + value
    assert len(result.tokens["CLS"]) <= 4                  # the where clause applied
    failing = query.replace('"random"', repr(NO_MODEL))
    with pytest.raises(lmq.ModelError, match="nonexistent"):
        lmq.run_sync(failing, review="great")
    # a call-time model= overrides the from clause
    assert lmq.run_sync(failing, review="great", model=random_model()).prompt.startswith("Review")


def test_clause_form_decoder_arguments_apply():
    with pytest.raises(lmq.ContextLimitError) as info:
        lmq.run_sync('argmax(max_len=6)\n    "Hi [WHO]"\nfrom\n    "random"\n')
    partial = info.value.result
    assert isinstance(partial, lmq.LMQResult)
    assert partial.prompt == "Hi "     # the hole never finished
    assert 0 < len(partial.tokens["WHO"]) <= 6


def test_one_line_clause_form(random_model):
    for seed in range(5):
        result = lmq.run_sync('argmax "Hi [WHO]" from "random" where len(TOKENS(WHO)) < 5',
                              model=random_model(seed))
        assert result.prompt == "Hi " + result.variables["WHO"]
        assert len(result.tokens["WHO"]) <= 4
    with pytest.raises(lmq.ContextLimitError):
        lmq.run_sync('argmax(max_len=5) "Hi [WHO]" from "random"')


def test_clause_keywords_are_case_insensitive(random_model):
    query = ('ARGMAX\n    "Hi [WHO]"\nFROM\n    "random"\nWhere\n    len(TOKENS(WHO)) < 3\n'
             'DISTRIBUTION\n    WHO in ["a", "b"]\n')
    program = compile_query(query)
    assert program.model.evaluate({}) == "random"
    assert program.distribution.variable == "WHO"
    result = lmq.run_sync(query.split("DISTRIBUTION")[0], model=random_model(1))
    assert len(result.tokens["WHO"]) <= 2


def test_decoder_names_and_clause_keywords_are_ordinary_names_in_program_form():
    assert lmq.run_sync("sample = 2\nwhere = 3\nargmax = 4\nbeam = 5\n"
                        "return sample + where + argmax + beam") == 14
    assert lmq.run_sync('"{sample}/{distribution}"', sample=1, distribution=2).prompt == "1/2"
    assert lmq.run_sync("from collections import OrderedDict\nreturn OrderedDict.__name__") \
        == "OrderedDict"


# --- prompt statements ----------------------------------------------------------------------

def test_all_python_string_forms_and_escapes():
    query = ('"dq\\t" \'sq\\n\'\n'
             'r"raw\\n[[x]]"\n'
             '"""triple\n\n\nblank lines kept"""\n'
             "'''single triple\n\n'''\n"
             '"\\x41\\u00e9\\\\ \\"q\\""\n'
             'f"f-prefix {n}"\n')
    expected = ('dq\tsq\n' 'raw\\n[x]' 'triple\n\n\nblank lines kept' 'single triple\n\n'
                'A\u00e9\\ "q"' 'f-prefix 7')
    assert lmq.run_sync(query, n=7).prompt == expected


def test_nothing_is_inserted_between_statements():
    assert lmq.run_sync('"a"\n"b"\nx = 1\n"c"\n').prompt == "abc"


def test_holes_fill_left_to_right_with_literal_text_between(random_model):
    query = ('"<[A]|[B]> and [C]!" where len(TOKENS(A)) < 3 and len(TOKENS(B)) < 3 and '
             'len(TOKENS(C)) < 3')
    for seed in range(5):
        model = random_model(seed)
        result = lmq.run_sync(query, model=model)
        v = result.variables
        assert result.prompt == f"<{v['A']}|{v['B']}> and {v['C']}!"
        assert list(result.tokens) == ["A", "B", "C"]
        for name in "ABC":
            assert token_text(model, result.tokens[name]) == v[name]


def test_interpolation_format_specs_and_expressions():
    query = '"{x:>5}|{x!r}|{x!s:^7}|{x:>{w}}|{d[\'k\']}|{a != b}|{n * 2}|{ {1: 2}[1] }"'
    result = lmq.run_sync(query, x="ab", w=4, d={"k": "K"}, a=1, b=2, n=21)
    assert result.prompt == "   ab|'ab'|  ab   |  ab|K|True|42|2"


def test_awaitable_interpolation_and_await_statement():
    async def fetch(word):
        await asyncio.sleep(0)
        return word.upper()

    query = '"<{fetch(\'a\')}>"\nx = await fetch("b")\n"{x}"\n'
    assert lmq.run_sync(query, fetch=fetch).prompt == "<A>B"


def test_interpolated_text_is_inert_and_never_opens_a_hole():
    text = "[X] {y} {:user}"
    result = lmq.run_sync('"{text}"', text=text, model=NO_MODEL)
    assert result.prompt == text and result.variables == {}


def test_bracket_and_brace_escapes(random_model):
    assert lmq.run_sync('"[[a]] {{b}} [[{x}]] }}{{"', x=1).prompt == "[a] {b} [1] }{"
    result = lmq.run_sync('"[[[X]]]" where len(TOKENS(X)) < 3', model=random_model())
    assert result.prompt == "[" + result.variables["X"] + "]"


def test_hole_annotations_and_decorators_are_carried():
    program = compile_query('"[X: f(3)] [@g Y] [Z: r\'\\d{3}\']"')
    x, y, z = program.holes
    assert (x.name, x.annotation.source, x.decorators) == ("X", "f(3)", ())
    assert (y.name, y.annotation, [d.source for d in y.decorators]) == ("Y", None, ["g"])
    # `{3}` inside the annotation is the regex's, not an interpolation
    assert z.annotation.evaluate({}) == "\\d{3}"
    assert set(program.free_names) == {"f", "g"}


def test_hole_decorator_maps_the_value(random_model):
    def shout(value):
        return value.upper() + "!"

    for seed in range(3):
        result = lmq.run_sync('"<[@shout X]>" where len(TOKENS(X)) < 4', shout=shout,
                              model=random_model(seed))
        generated = result.prompt[1:-1]           # the prompt keeps the generated text
        assert result.variables["X"] == shout(generated)
    defined_in_query = ('def wrap(v):\n    return "(" + v + ")"\n'
                        '"[@wrap X]" where len(TOKENS(X)) < 3\nreturn X')
    value = lmq.run_sync(defined_in_query, model=random_model())
    assert value.startswith("(") and value.endswith(")")


# --- where clauses: inline, global, conjunction -------------------------------------------------

def test_inline_and_global_where_are_conjoined(random_model):
    query = 'argmax\n    "[A]" where len(TOKENS(A)) > 3\nwhere\n    len(TOKENS(A)) < 6\n'
    counts = {len(lmq.run_sync(query, model=random_model(s, end_probability=0.5)).tokens["A"])
              for s in range(40)}
    assert counts == {4, 5}        # both bounds hold and both ends are reachable


def test_inline_where_constrains_only_its_own_statement(random_model):
    # conjoined, the two bounds would be unsatisfiable
    query = '"[A]" where len(TOKENS(A)) == 1\nfirst = A\n"|"\n"[A]" where len(TOKENS(A)) == 5\n'
    model = random_model()
    vocabulary = set(model.backend().vocabulary.token_bytes)
    for seed in range(3):
        result = lmq.run_sync(query, model=random_model(seed))
        assert len(result.tokens["A"]) == 5
        first, second = lmq.run_sync(query + "return (first, A)", model=random_model(seed))
        assert first.encode() in vocabulary and second == result.variables["A"]
        assert result.prompt == first + "|" + second


def test_global_where_applies_in_every_iteration(random_model):
    query = ('argmax\n    values = []\n    for i in range(4):\n        "{i}:[X];"\n'
             '        values.append(X)\n    return values\nwhere\n'
             '    STOPS_BEFORE(X, "e") and len(TOKENS(X)) < 6\n')
    for seed in range(5):
        values = lmq.run_sync(query, model=random_model(seed))
        assert len(values) == 4
        assert all("e" not in value for value in values)


# --- program semantics -----------------------------------------------------------------------

PROGRAM = '''import math
from contextlib import nullcontext  # `from` is Python's here
# a comment line
total = 0
for i in range(6):
    if i == 1:
        continue
    elif i == 4:
        break
    else:
        total += i
    "{i},"
n = 0
while True:
    n += 1
    if n == 3:
        break
try:
    "t"
    raise KeyError("k")
except KeyError as error:
    "c{error}"
finally:
    "f"
class Box:
    label = "box"
def twice(s):
    "a docstring, not a prompt"
    return s * 2
with nullcontext(Box()) as b:
    "{b.label}"
async def later():
    return "L"
x = await later()
assert math.floor(2.5) == 2, "never"
"{twice(x)}[X]" where len(TOKENS(X)) < 3
'''


def test_python_statements(random_model):
    result = lmq.run_sync(PROGRAM, model=random_model())
    assert result.prompt == "0,2,3,tc'k'fboxLL" + result.variables["X"]
    assert lmq.run_sync(PROGRAM + "return (total, n, x, twice(3))", model=random_model()) == \
        (5, 3, "L", 6)
    with pytest.raises(AssertionError, match="no"):
        lmq.run_sync('assert 1 == 2, "no"')


def test_holes_in_loops_keep_the_last_value_and_its_tokens(random_model):
    model = random_model(4)
    query = ('seen = []\nfor i in range(3):\n    "[X]," where len(TOKENS(X)) < 3\n'
             '    seen.append(X)\n')
    result = lmq.run_sync(query + "return seen", model=model)
    assert len(result) == 3
    full = lmq.run_sync(query, model=random_model(4))
    assert full.prompt == "".join(v + "," for v in result)
    assert full.variables["X"] == result[-1]
    assert token_text(model, full.tokens["X"]) == result[-1]


def test_query_without_holes_never_loads_a_model():
    result = lmq.run_sync('x = 2\nfor i in range(x):\n    "line {i}\\n"\n', model=NO_MODEL)
    assert result.prompt == "line 0\nline 1\n"
    with pytest.raises(lmq.ModelError, match="nonexistent"):
        lmq.run_sync('"[X]"', model=NO_MODEL)       # the same model is loaded for a hole


def test_empty_and_comment_only_queries_run():
    assert lmq.run_sync("").prompt == ""
    assert lmq.run_sync("# nothing here\n").prompt == ""


# --- parameters and arguments -----------------------------------------------------------------

def test_free_names_are_parameters_in_order_of_first_use(random_model):
    query = lmq.query('"{zeta}{alpha}[X]" where len(TOKENS(X)) < limit\n'
                      'local = 1\nreturn (zeta, alpha, local)')
    assert query.program.free_names == ("zeta", "alpha", "limit")
    assert query(1, 2, 3, model=random_model()) == (1, 2, 1)
    assert query(alpha=1, zeta=2, limit=3, model=random_model()) == (2, 1, 1)
    with pytest.raises(lmq.QueryArgumentError, match="3 positional"):
        query(1, 2, 3, 4, model=random_model())


def test_values_come_from_arguments_then_the_defining_scope():
    greeting = "hello"

    def inner():
        name = "inner"
        return lmq.run_sync('"{greeting} {name} {len(name)}"', greeting=greeting)

    assert inner().prompt == "hello inner 5"
    assert lmq.run_sync('"{greeting}"', greeting="override").prompt == "override"


def test_missing_argument_is_named_before_any_model_call():
    with pytest.raises(lmq.QueryArgumentError, match="alpha") as info:
        lmq.run_sync('"{zeta} {alpha} [X]"', 1, model=NO_MODEL)
    assert "zeta" not in str(info.value)
    with pytest.raises(lmq.QueryArgumentError, match="limit"):
        lmq.run_sync('"[X]" where len(TOKENS(X)) < limit', model=NO_MODEL)


def test_unknown_keyword_argument_is_named_before_any_model_call():
    with pytest.raises(lmq.QueryArgumentError, match="bogus"):
        lmq.run_sync('"{a} [X]"', a=1, bogus=2, model=NO_MODEL)

    @lmq.query(model=NO_MODEL)
    def decorated(a):
        '''lmq
        "{a}[X]"
        '''

    with pytest.raises(lmq.QueryArgumentError, match="bogus"):
        decorated(1, bogus=2)


# --- the Python API -------------------------------------------------------------------------

def test_query_decorator_on_sync_and_async_functions(random_model):
    @lmq.query(model=random_model(2))
    def sync_query(topic, suffix="!"):
        '''lmq
        "About {topic}:\n[X]{suffix}" where len(TOKENS(X)) < 4
        return X
        '''

    @lmq.query(model=random_model(2))
    async def async_query(topic, suffix="!"):
        '''lmq
        "About {topic}:\n[X]{suffix}" where len(TOKENS(X)) < 4
        return X
        '''

    value = sync_query("cats")
    assert isinstance(value, str)
    pending = async_query("cats")
    assert asyncio.iscoroutine(pending)
    assert asyncio.run(pending) == value
    # the docstring is read as written: `\n` reaches the query as an escape, and the
    # `lmq` marker line is skipped
    assert sync_query.program.source.startswith('"About {topic}:\\n[X]{suffix}"')
    # call-time options override the decorator's
    assert sync_query("cats", model=random_model(2)) == value

    async def concurrently():
        return await asyncio.gather(*(async_query(t) for t in ("a", "b", "c")))

    assert asyncio.run(concurrently()) == [value] * 3


def test_docstring_escape_becomes_a_line_break(random_model):
    @lmq.query(model=random_model())
    def with_newline():
        '''lmq
        "one\ntwo [X]" where len(TOKENS(X)) < 2
        '''

    assert with_newline().prompt.startswith("one\ntwo ")


def test_query_text_is_compiled_once_and_called_many_times(random_model):
    source = '"{word}:[X]" where len(TOKENS(X)) < 3\nreturn (word, X)'
    query = lmq.query(source)
    assert query.program is compile_query(source)
    results = [query(w, model=random_model(1)) for w in ("a", "b", "a")]
    assert [r[0] for r in results] == ["a", "b", "a"]
    assert results[0] == results[2]
    assert query.program is compile_query(source)


def test_F_returns_a_value_for_one_hole_and_a_dict_for_several(random_model):
    one = lmq.F("Say {word}:[X]", "len(TOKENS(X)) < 3", model=random_model(1))
    value = one("hi")
    assert isinstance(value, str) and value == one(word="hi")
    two = lmq.F("[A] and [B]", "len(TOKENS(A)) < 2 and len(TOKENS(B)) < 3", model=random_model(1))
    both = two()
    assert set(both) == {"A", "B"} and all(isinstance(v, str) for v in both.values())


def test_sync_call_inside_a_running_event_loop_says_to_await(random_model):
    @lmq.query(model=random_model())
    def sync_query():
        '''lmq
        "x"
        '''

    async def inside():
        with pytest.raises(lmq.LmqError, match="await"):
            lmq.run_sync('"x"')
        with pytest.raises(lmq.LmqError, match="await"):
            sync_query()
        return await lmq.run('"y"')               # the async form works there

    assert asyncio.run(inside()).prompt == "y"


# --- nested queries ---------------------------------------------------------------------------

@lmq.query(model=NO_MODEL)          # nested, it runs on the caller's model instead
def scored(n):
    '''lmq
    "<{n}:[Y]>" where STOPS_AT(Y, "e") and len(TOKENS(Y)) < 20
    return n * 10
    '''


@lmq.query
def macro(tag):
    '''lmq
    "<{tag}[Z]>" where len(TOKENS(Z)) < 3
    '''


def test_nested_query_with_return_replaces_its_text(random_model):
    result = lmq.run_sync('"A[X: scored(3)]B"\n', model=random_model())
    assert result.prompt == "A30B"
    assert result.variables == {"X": 30}            # bound to the value itself, not a string
    assert set(result.tokens) == set()              # the nested hole is not the caller's


def test_nested_query_without_return_is_a_macro(random_model):
    result = lmq.run_sync('"A[M: macro(\'t\')]B" where len(TOKENS(M)) < 1', model=random_model())
    text = result.variables["M"]
    assert text.startswith("<t") and text.endswith(">")
    assert result.prompt == "A" + text + "B"
    assert "Z" not in result.variables and "Z" not in result.tokens


def test_a_query_defined_inside_a_query_string_reads_its_docstring_as_written(random_model):
    """Its docstring has no source file to be read back from: `\\n` inside its prompt
    string stays an escape (as in a .py file), not a line break that ends the string."""
    source = ("import lmq\n"
              "@lmq.query\n"
              "def inner(q):\n"
              "    \'\'\'lmq\n"
              "    \"Q: {q}\\nA:[A]\" where A in [\"x\", \"y\"]\n"
              "    return A + \"!\"\n"
              "    \'\'\'\n"
              "\"[V: inner(\'k\')]\"\n")
    result = lmq.run_sync(source, model=random_model())
    assert result.variables["V"] in ("x!", "y!")


def test_nested_constraints_apply_only_inside_it(random_model):
    query = ('"[Y]" where len(TOKENS(Y)) == 4\n"[X: scored(n)]"\nreturn (Y, X)')
    for seed in range(5):
        model = random_model(seed)
        result = lmq.run_sync(query.replace("\nreturn (Y, X)", ""), n=2, model=model)
        # the caller's Y keeps its own constraint and its own tokens
        assert len(result.tokens["Y"]) == 4
        assert token_text(model, result.tokens["Y"]) == result.variables["Y"]
        assert result.prompt == result.variables["Y"] + "20"


def test_nested_query_arguments_see_earlier_holes(random_model):
    @lmq.query
    def echo(text):
        '''lmq
        "({text})"
        return text.upper()
        '''

    result = lmq.run_sync('"[A]|[B: echo(A)]" where len(TOKENS(A)) < 3', model=random_model())
    assert result.variables["B"] == result.variables["A"].upper()
    assert result.prompt == result.variables["A"] + "|" + result.variables["A"].upper()


# --- chat ----------------------------------------------------------------------------------------

def test_chat_tags_render_through_the_model_template(random_model):
    query = ('"You are terse.{:user}Say hi{:assistant}[R]"\n"{:user}Again{:assistant}[S]" '
             'where len(TOKENS(R)) < 8 and len(TOKENS(S)) < 8')
    for seed in range(3):
        result = lmq.run_sync(query, model=random_model(seed, end_probability=0.2))
        r, s = result.variables["R"], result.variables["S"]
        assert result.prompt == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                                 "<|im_start|>user\nSay hi<|im_end|>\n"
                                 f"<|im_start|>assistant\n{r}<|im_end|>\n"
                                 "<|im_start|>user\nAgain<|im_end|>\n"
                                 f"<|im_start|>assistant\n{s}<|im_end|>\n")


def test_chat_tags_without_a_template_render_as_text(random_model):
    result = lmq.run_sync('"{:system}Be brief.{:user}hi{:assistant}[R]" where len(TOKENS(R)) < 3',
                          model=random_model(vocab=GPT2_VOCAB))
    assert result.prompt == ("\n((system)):Be brief.\n((user)):hi\n((assistant)):"
                             + result.variables["R"])


# --- compilation ---------------------------------------------------------------------------------

def test_compiled_queries_are_cached_by_source():
    source = '"cached [X]"\n'
    assert compile_query(source) is compile_query(source)
    assert compile_query(source) is not compile_query(source + "\n")


@pytest.mark.parametrize("source,line", [
    ('"a"\nx = 1\n"""multi\n\nline"""\ny = 1 / 0\n', 6),
    ('x = {}\n"a [X]" where (len(TOKENS(X)) < 3 and\n    STOPS_AT(X, "."))\n"b"\n'
     'x["missing"]\n', 5),
    ('argmax(max_len=64)\n    "Q:\\n"\n    """A:\n\n[X]""" where len(TOKENS(X)) < 2\n'
     '    z = 1 / 0\nfrom\n    "random"\nwhere\n    len(TOKENS(X)) < 9\n', 6),
])
def test_generated_program_keeps_the_query_line_numbers(source, line):
    program = compile_query(source)
    assert program.python.count("\n") == source.count("\n")
    with pytest.raises((ZeroDivisionError, KeyError)) as info:
        lmq.run_sync(source, model=lmq.model("random"))
    frames = [f for f in traceback.extract_tb(info.value.__traceback__) if f.filename == "<query>"]
    assert frames and frames[-1].lineno == line
