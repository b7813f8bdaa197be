"""Bad inputs are `LmqError`s with a message (query text: with line and column), never
raw Python exceptions; the CLI ones through real subprocesses, without a traceback."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import lmq
from lmq import cli
from lmq.compiler.codegen import compile_query
from lmq.runtime.decoders import MAX_N

ROOT = Path(__file__).resolve().parent.parent


def lmq_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lmq.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def syntax_error(query: str) -> lmq.LmqSyntaxError:
    with pytest.raises(lmq.LmqSyntaxError) as caught:
        compile_query(query)
    return caught.value


@pytest.mark.parametrize("query,column", [
    ('"a[X]" where ' + "not " * 324 + "X == 'a'", 406),
    ('"a[X]" where ' + "lambda: " * 323 + "1", 798),
    ("x = " + "{1:" * 162 + "1" + "}" * 162, 297),
    ("x = " + "+".join(["1"] * 5000), 5),
    ("x = " + "-" * 50000 + "1", 1000),
    ('"a[X]" where X == ' + " + ".join(["'a'"] * 3000), 19),
    ('"a {' + "not " * 5000 + '1} [X]"', 5),
    ('"a [X: ' + "-" * 5000 + '1]"', 4),
])
def test_deep_nesting_is_a_syntax_error_at_its_place(query, column):
    error = syntax_error(query)
    assert "nested too deeply" in error.message
    assert (error.line, error.column) == (1, column)


def test_deep_blocks_are_pythons_indentation_error_at_their_line():
    query = "".join(" " * i + "if 1:\n" for i in range(488)) + " " * 488 + "pass\n"
    error = syntax_error(query)
    assert error.line == 101 and "indentation" in error.message


def test_nesting_just_under_the_limit_compiles():
    compile_query('"a[X]" where ' + "not " * 90 + "X == 'a'")
    compile_query("x = " + "+".join(["1"] * 90) + '\n"a {' + "-" * 90 + "1} [X]\"")


@pytest.mark.parametrize("query,message,column", [
    ('"a\x00b [X]"', "NUL", 3),
    ('"a\ud800 [X]"', "lone surrogate U+D800", 3),
    ('"a \\ud800 [X]"', "lone surrogate", 1),
    ('"a \\N{NO SUCH NAME} [X]"', "invalid prompt string", 1),
    ('"a\rb [X]"', "unterminated string", 1),
    ('"a [X]" where (yield)', "'yield' outside function", 16),
    ('"a [X]" where await X', "'await' outside function", 15),
    ('x = 1\nyield x\n"a [X]"', "'yield' outside a def", 1),
])
def test_text_python_cannot_compile_is_a_syntax_error(query, message, column):
    error = syntax_error(query)
    assert message in error.message and error.column == column


def test_crlf_line_ends_are_line_ends():
    program = compile_query('x = 1\r\n"a {x} [X]"\r\n')
    assert program.holes[0].line == 2


@pytest.mark.parametrize("clause", ['X in ["\\ud800", "b"]', 'X == "\\udc80"', '"\\ud800" in X',
                                    'STOPS_AT(X, "\\ud800")'])
def test_a_surrogate_in_a_where_operand_is_a_constraint_error(clause):
    with pytest.raises(lmq.ConstraintError, match="lone surrogate U\\+D[8C]"):
        lmq.query(f'"a [X]" where {clause}')


def test_a_surrogate_interpolated_at_run_time_is_an_lmq_error(random_model):
    with pytest.raises(lmq.LmqError, match="lone surrogate U\\+D800"):
        lmq.run_sync('"{s} [X]" where len(TOKENS(X)) < 3', s="a\ud800", model=random_model())


@pytest.mark.parametrize("decoder,message", [
    ("argmax(max_len='x')", "max_len must be an int >= 1"),
    ("argmax(max_len=0)", "max_len must be an int >= 1"),
    ("sample(seed=-2)", "seed must be an int >= 0, or -1"),
    ("sample(seed='x')", "seed must be"),
    ("sample(temperature='hot')", "temperature='hot': must be a finite number"),
    ("argmax(top_k=1.5)", "top_k=1.5: must be an int"),
    ("sample(n=100000)", f"n must be an int from 1 to {MAX_N}"),
    ("beam(n=100000)", f"n must be an int from 1 to {MAX_N}"),
    (f"best_k(k={MAX_N + 1})", f"n must be an int from 1 to {MAX_N}"),
])
def test_bad_decoder_arguments_are_named(random_model, decoder, message):
    with pytest.raises(lmq.QueryArgumentError, match=re.escape(message)):
        lmq.run_sync('"a [X]" where len(TOKENS(X)) < 3', decoder=decoder, model=random_model())


def test_seed_minus_one_draws_a_fresh_random_seed(random_model):
    """llama.cpp's -1: every run draws its own seed (a fixed seed repeats its samples)."""
    def values(seed):
        return {lmq.run_sync('"a [X]" where len(TOKENS(X)) < 4', decoder="sample", seed=seed,
                             temperature=5.0, model=random_model(0)).variables["X"] for _ in range(6)}
    assert len(values(3)) == 1
    assert len(values(-1)) > 1


def test_the_largest_n_runs(random_model):
    results = lmq.run_sync('"a [X]" where len(TOKENS(X)) < 2', decoder=f"sample(n={MAX_N})",
                           model=random_model())
    assert len(results) == MAX_N


@pytest.mark.parametrize("decoder", ["argmax", "sample(n=2)", "beam(n=2)"])
def test_a_prompt_longer_than_the_context_says_by_how_many_tokens(random_model, decoder):
    model = random_model(n_ctx=64)
    prompt = "word " * 200
    backend = model.backend()
    length = len(backend.tokenize(prompt)) + int(backend.vocabulary.add_bos)
    with pytest.raises(lmq.ContextLimitError) as caught:
        lmq.run_sync('"{p}[X]" where len(TOKENS(X)) < 3', p=prompt, decoder=decoder, model=model)
    assert f"is {length} tokens, {length - 64} more than the model's context of 64 tokens" \
        in str(caught.value)


def test_a_prompt_longer_than_max_len_names_max_len(random_model):
    with pytest.raises(lmq.ContextLimitError, match=r"more than max_len=8$"):
        lmq.run_sync('"{p}[X]"', p="word " * 20, decoder="argmax(max_len=8)", model=random_model())


def test_an_int_value_longer_than_pythons_digit_limit_is_an_int(random_model):
    digits = "7" * 4500
    result = lmq.run_sync('"n: [N: int]" where N == digits', digits=digits,
                          model=random_model(n_ctx=8192))
    value = result.variables["N"]
    assert isinstance(value, int) and value == int(digits[:4000]) * 10 ** 500 + int(digits[4000:])


class CompileSentinel:
    """Found by a where clause through `object.__subclasses__()` if it is ever evaluated."""
    hits: list = []


_REACHES_SENTINEL = ('[c for c in ().__class__.__base__.__subclasses__() '
                     "if c.__name__ == 'CompileSentinel'][0].hits")


def test_defining_and_compiling_a_query_evaluates_none_of_its_code(tmp_path, capsys, random_model):
    query = f'"a [X]" where X in [{_REACHES_SENTINEL}.append(1) or "a"] and len(TOKENS(X)) < 3\n'
    (tmp_path / "q.lmq").write_text(query)
    defined = lmq.query(query)
    assert cli.main(["compile", "--gbnf", str(tmp_path / "q.lmq")]) == 0
    assert f"# run-time values: [{_REACHES_SENTINEL}.append(1) or 'a']" in capsys.readouterr().out
    assert CompileSentinel.hits == []
    assert defined(model=random_model()).variables["X"] == "a"    # running it runs it
    assert CompileSentinel.hits == [1]
    CompileSentinel.hits.clear()


def test_literal_constraints_are_still_checked_when_a_query_is_defined():
    with pytest.raises(lmq.UnsatisfiableConstraint, match="X"):
        lmq.query('"a [X]" where X in ["a"] and X in ["b"]')


def test_lmq_compile_runs_no_shell_command(tmp_path):
    marker = tmp_path / "ran"
    clause = ('[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "_wrap_close"]'
              f'[0].__init__.__globals__["system"]("touch {marker}")')
    (tmp_path / "q.lmq").write_text(f'"a [X]" where X in [{clause} and "a"]\n')
    done = lmq_cli("compile", "--gbnf", str(tmp_path / "q.lmq"))
    assert done.returncode == 0, done.stderr
    assert "# run-time values:" in done.stdout
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (bytes(range(128, 256)) * 3, "line 1, column 1: not UTF-8 text (invalid start byte, byte 0x80)"),
    ('"café"\n"x [X]"\n'.encode("latin-1"), "line 1, column 5: not UTF-8 text"),
    ('"Hi [X]"\n'.encode("utf-16-le"), "line 1, column 2: a NUL byte: a binary file, or UTF-16 "
                                        "without a byte-order mark"),
    (b"\xff\xfe" + '"\ud800"'.encode("utf-16-le", "surrogatepass"), "line 1, column 2: not UTF-16-LE text (illegal UTF-16 surrogate"),
])
def test_files_that_are_not_text_are_named_errors(tmp_path, content, message):
    path = tmp_path / "q.lmq"
    path.write_bytes(content)
    done = lmq_cli("run", str(path))
    assert done.returncode == 1
    assert f"lmq: LmqSyntaxError: {path}, {message}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be"])
def test_utf8_and_utf16_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    path = tmp_path / "q.lmq"
    text = '"Ça [X]" where len(TOKENS(X)) < 3\r\n'
    data = text.encode(encoding)
    path.write_bytes(data if encoding != "utf-16-be" else b"\xfe\xff" + data)
    done = lmq_cli("run", str(path), "--model", "random", "--json")
    assert done.returncode == 0, done.stderr
    assert '"prompt": "Ça ' in done.stdout


def test_deeply_nested_arg_values_are_text_not_a_crash(tmp_path):
    (tmp_path / "q.lmq").write_text("return len(x)\n")
    for value in ("-" * 100000 + "1", "[" * 100000, "[" * 150 + "1" + "]" * 150, "{[1]: 2}"):
        done = lmq_cli("run", str(tmp_path / "q.lmq"), "--arg", f"x={value}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(len(value))


def test_bad_decoder_argument_on_the_command_line(tmp_path):
    (tmp_path / "q.lmq").write_text('"a [X]" where len(TOKENS(X)) < 3\n')
    done = lmq_cli("run", str(tmp_path / "q.lmq"), "--model", "random",
                   "--decoder", "argmax(max_len='x')")
    assert done.returncode == 2
    assert "lmq: decoder argmax: max_len must be an int >= 1, not 'x'" in done.stderr


def test_over_long_prompt_on_the_command_line(tmp_path):
    (tmp_path / "q.lmq").write_text('"{p}[X]"\n')
    done = lmq_cli("run", str(tmp_path / "q.lmq"), "--model", "random", "--arg", "p=" + "word " * 5000)
    assert done.returncode == 1
    assert re.search(r"lmq: ContextLimitError: the prompt before X is \d+ tokens, \d+ more than "
                     r"the model's context of 4096 tokens", done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_a_returned_int_longer_than_pythons_digit_limit_prints(tmp_path):
    (tmp_path / "q.lmq").write_text('return int("7" * 4000) * 10 ** 1000\n')
    for flags in ((), ("--json",)):
        done = lmq_cli("run", str(tmp_path / "q.lmq"), *flags)
        assert done.returncode == 0, done.stderr
        assert "7" * 4000 + "0" * 1000 in done.stdout


@pytest.mark.parametrize("args,message", [
    (("--port", "99999"), "--port must be from 0 to 65535 (0 picks a free one), not 99999"),
    (("--port", "-1"), "--port must be from 0 to 65535"),
    (("--host", "no-such-host.invalid"), "cannot resolve --host 'no-such-host.invalid'"),
])
def test_serve_model_checks_its_address_before_loading_a_model(args, message):
    done = lmq_cli("serve-model", "llama.cpp:/no/such/model.gguf", *args, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "loading" not in done.stderr and "Traceback" not in done.stderr


def test_serve_model_refuses_a_port_in_use_before_loading_a_model():
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = lmq_cli("serve-model", "llama.cpp:/no/such/model.gguf", "--port", str(port), timeout=60)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "loading" not in done.stderr


def test_names_bound_inside_a_where_clause_are_not_parameters(random_model):
    query = lmq.query('"a [X]" where X in [w.strip() for w in words] and len(TOKENS(X)) < 3')
    assert query.program.free_names == ("words",)
    assert query(words=[" b "], model=random_model()).variables["X"] == "b"


def test_an_exception_of_the_querys_own_code_is_a_message_with_its_lines(tmp_path):
    path = tmp_path / "q.lmq"
    path.write_text("x = 1\ndef f(v):\n    return len(v)\nreturn f(x)\n")
    done = lmq_cli("run", str(path))
    assert done.returncode == 1
    assert done.stderr == (f"lmq: TypeError in the query: object of type 'int' has no len()\n"
                           f"  {path}, line 4: return f(x)\n  {path}, line 3: return len(v)\n")
