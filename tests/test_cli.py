"""`lmq run` and `lmq compile` as real subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lmq(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lmq.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_run_prints_prompt_and_variables(tmp_path):
    query = tmp_path / "q.lmq"
    query.write_text('"Q: What is 1 + 1?\\nA:[X]" where len(TOKENS(X)) < 6 and STOPS_AT(X, "\\n")\n')
    done = lmq("run", str(query))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Q: What is 1 + 1?\nA:")
    assert "X = '" in done.stdout


def test_run_json_with_arguments(tmp_path):
    query = tmp_path / "q.lmq"
    query.write_text('"{greeting}, {name}! Reply:[X]" where len(TOKENS(X)) < 4\n')
    done = lmq("run", str(query), "--arg", "greeting=Hello", "--arg", "name=Ada", "--json",
               "--model", "random")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["prompt"].startswith("Hello, Ada! Reply:")
    assert len(result["tokens"]["X"]) <= 3


def test_literal_arguments_are_python_values(tmp_path):
    query = tmp_path / "q.lmq"
    query.write_text('return n * 2\n')
    done = lmq("run", str(query), "--arg", "n=21", "--json")
    assert json.loads(done.stdout) == {"return": 42}


def test_model_arguments_reach_the_model(tmp_path):
    query = tmp_path / "q.lmq"
    query.write_text('"' + "word " * 300 + '[X]" where len(TOKENS(X)) < 3\n')
    done = lmq("run", str(query), "--model-arg", "n_ctx=1024", "--model-arg", "flash_attn=False")
    assert done.returncode == 0, done.stderr
    done = lmq("run", str(query), "--model-arg", "n_ctx=256")    # the prompt no longer fits
    assert done.returncode == 1 and "context of 256 tokens" in done.stderr, done.stderr
    clause = tmp_path / "clause.lmq"
    clause.write_text('argmax "Hi[X]" from "random" where len(TOKENS(X)) < 3\n')
    done = lmq("run", str(clause), "--model-arg", "seed=1")
    assert done.returncode == 2 and "name it with --model" in done.stderr


@pytest.mark.parametrize("args,code,message", [
    (("run", "QUERY", "--arg", "who=x", "--model-arg", "n_gpu_layer=1"), 2, "unknown llama.cpp argument: n_gpu_layer"),
    (("run", "missing.lmq"), 2, "query file not found: missing.lmq"),
    (("run", "QUERY", "--arg", "novalue"), 2, "NAME=VALUE"),
    (("run", "QUERY"), 2, "no value for who"),
    (("run", "QUERY", "--arg", "who=x", "--decoder", "argmax(nope=1)"), 2, "nope"),
    (("run", "QUERY", "--arg", "who=x", "--model", "local:llama.cpp:/no/such.gguf"), 1, "/no/such.gguf"),
    (("run", "BROKEN"), 1, "line 2"),
    (("frobnicate",), 2, "invalid choice"),
])
def test_errors_have_messages_and_exit_codes(tmp_path, args, code, message):
    (tmp_path / "q.lmq").write_text('"Hi {who}:[X]" where len(TOKENS(X)) < 3\n')
    (tmp_path / "broken.lmq").write_text('"fine"\n"broken [1x]"\n')
    args = [str(tmp_path / "q.lmq") if a == "QUERY" else str(tmp_path / "broken.lmq") if a == "BROKEN" else a
            for a in args]
    done = lmq(*args)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_compile_shows_program_and_holes(tmp_path):
    query = tmp_path / "q.lmq"
    query.write_text('"Q: {question}\\nA:[ANSWER]" where STOPS_AT(ANSWER, ".")\n')
    done = lmq("compile", str(query))
    assert done.returncode == 0
    assert "# parameters: question" in done.stdout
    assert "ANSWER = await _ctx.hole(0" in done.stdout
    assert "STOPS_AT(ANSWER, '.')" in done.stdout
