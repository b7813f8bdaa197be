"""The VS Code grammars (editors/vscode) tokenized by the engine VS Code uses
(vscode-textmate + vscode-oniguruma under node): the examples and two fixtures give the
expected scopes for holes, typed holes, decorators, interpolations, chat tags, clause
keywords, and prompt strings inside `'''lmq` docstrings of Python files."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = ROOT / "editors" / "vscode"
FIXTURES = EXTENSION / "test" / "fixtures"


def _node_modules() -> None:
    """Install the extension's pinned devDependencies (package-lock.json) when missing."""
    if (EXTENSION / "node_modules" / "vscode-textmate").is_dir():
        return
    npm = shutil.which("npm")
    assert npm, "the grammar tests need node and npm on the PATH"
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXTENSION,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def tokens():
    """`tokens(path)` → [(line, text, scopes)] of that file, all files tokenized in one node run."""
    _node_modules()
    files = sorted((ROOT / "examples").glob("*.lmq")) + sorted(FIXTURES.iterdir())
    done = subprocess.run(["node", "test/tokenize.js", *map(str, files)], cwd=EXTENSION,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    by_file = {Path(name).resolve(): toks for name, toks in json.loads(done.stdout).items()}
    return lambda path: by_file[Path(path).resolve()]


def scopes(tokens, path, line, text, nth=0):
    """Scopes of the nth token spelled `text` on a line of a file."""
    found = [s for n, t, s in tokens(path) if n == line and t == text]
    assert len(found) > nth, f"no token {text!r} on line {line} of {path}: " + \
        repr([t for n, t, _ in tokens(path) if n == line])
    return found[nth]


def lmq_scopes(found):
    """The lmq scopes among a token's scopes, below the file's own (source.lmq)."""
    return [s for s in found[1:] if s.endswith(".lmq")]


def example(name):
    return ROOT / "examples" / name


def test_holes(tokens):
    name = scopes(tokens, example("capital.lmq"), 3, "ANSWER")
    assert {"string.quoted.double.prompt.lmq", "meta.hole.lmq", "variable.other.hole.lmq"} <= set(name)
    assert "punctuation.definition.hole.begin.lmq" in scopes(tokens, example("capital.lmq"), 3, "[")
    assert "punctuation.definition.hole.end.lmq" in scopes(tokens, example("capital.lmq"), 3, "]")
    assert "variable.other.hole.lmq" in scopes(tokens, example("shopping_list.lmq"), 5, "ITEM")
    assert "variable.other.hole.lmq" in scopes(tokens, example("translate.lmq"), 7, "TRANSLATION")


def test_typed_holes(tokens):
    order = example("order.lmq")
    assert "variable.other.hole.lmq" in scopes(tokens, order, 12, "COUNT")
    assert "punctuation.separator.annotation.lmq" in scopes(tokens, order, 12, ":")
    assert {"meta.hole.annotation.lmq", "support.type.python"} <= set(scopes(tokens, order, 12, "int"))
    regex = scopes(tokens, order, 13, "0")            # [TIME: r'[0-2][0-9]:…']: a regex annotation
    assert "meta.hole.annotation.lmq" in regex and any(s.startswith("string.regexp") for s in regex)
    assert "meta.hole.annotation.lmq" in scopes(tokens, order, 14, "Customer")
    nested = example("nested.lmq")
    assert "variable.other.hole.lmq" in scopes(tokens, nested, 12, "FIRST")
    call = scopes(tokens, nested, 12, "short_answer")
    assert "meta.hole.annotation.lmq" in call and "meta.function-call.generic.python" in call


def test_decorators(tokens):
    one_line = FIXTURES / "one_line.lmq"
    assert "entity.name.function.decorator.lmq" in scopes(tokens, one_line, 2, "lmq.pre_fill")
    assert "entity.name.function.decorator.lmq" in scopes(tokens, one_line, 2, "upper")
    assert "variable.other.hole.lmq" in scopes(tokens, one_line, 2, "WHO")
    clause = FIXTURES / "clause_form.lmq"
    assert "entity.name.function.decorator.lmq" in scopes(tokens, clause, 4, "str.strip")
    assert "variable.other.hole.lmq" in scopes(tokens, clause, 4, "CLS")


def test_interpolations_and_escapes(tokens):
    translate = example("translate.lmq")
    assert "punctuation.section.interpolation.begin.lmq" in scopes(tokens, translate, 5, "{")
    inner = scopes(tokens, translate, 5, "language")
    assert {"meta.interpolation.lmq", "meta.embedded.inline.python"} <= set(inner)
    call = scopes(tokens, translate, 6, "get")        # {known.get(language, 'dog')}: Python inside
    assert "meta.interpolation.lmq" in call and "meta.function-call.generic.python" in call
    clause = FIXTURES / "clause_form.lmq"
    for escape in ("[[", "]]", "{{", "}}"):
        assert "constant.character.escape.bracket.lmq" in scopes(tokens, clause, 4, escape)
    assert "meta.hole.lmq" not in scopes(tokens, clause, 4, "sic")
    assert "constant.character.escape.python" in scopes(tokens, example("capital.lmq"), 2, "\\n")


def test_chat_tags(tokens):
    chat = example("chat.lmq")
    for line, role in ((3, "system"), (4, "user"), (5, "assistant")):
        assert {"meta.chat-tag.lmq", "entity.name.tag.chat.lmq"} <= set(scopes(tokens, chat, line, role))
    assert "meta.interpolation.lmq" not in scopes(tokens, chat, 3, "system")
    assert "variable.other.hole.lmq" in scopes(tokens, chat, 5, "REPLY")


def test_clause_keywords(tokens):
    keyword = "keyword.control.clause.lmq"
    assert keyword in scopes(tokens, example("capital.lmq"), 3, "where")           # inline where
    assert "support.function.constraint.lmq" in scopes(tokens, example("capital.lmq"), 3, "STOPS_AT")
    assert "support.function.constraint.lmq" in scopes(tokens, example("capital.lmq"), 3, "TOKENS")
    translate = example("translate.lmq")
    assert "keyword.other.decoder.lmq" in scopes(tokens, translate, 3, "argmax")
    assert keyword in scopes(tokens, translate, 8, "where")                         # clause where
    assert "support.function.constraint.lmq" in scopes(tokens, translate, 9, "STOPS_BEFORE")
    clause = FIXTURES / "clause_form.lmq"
    assert "keyword.other.decoder.lmq" in scopes(tokens, clause, 2, "sample")
    for line, word in ((5, "FROM"), (7, "where"), (9, "distribution")):
        assert keyword in scopes(tokens, clause, line, word)
    model = scopes(tokens, clause, 6, '"local:llama.cpp:model.gguf"')
    assert "string.quoted.model.lmq" in model and "string.quoted.double.prompt.lmq" not in model
    assert not lmq_scopes(scopes(tokens, clause, 11, "sample"))  # a plain name
    one_line = FIXTURES / "one_line.lmq"
    assert "keyword.other.decoder.lmq" in scopes(tokens, one_line, 2, "argmax")
    assert keyword in scopes(tokens, one_line, 2, "from") and keyword in scopes(tokens, one_line, 2, "where")
    assert "string.quoted.model.lmq" in scopes(tokens, one_line, 2, '"random"')
    imports = scopes(tokens, example("order.lmq"), 3, "from")                       # Python's from
    assert "keyword.control.import.python" in imports and keyword not in imports


def test_lmq_docstrings(tokens):
    for path, line, hole, parameter in ((example("nested.lmq"), 7, "A", "question"),
                                        (FIXTURES / "query.py", 7, "CITY", "country")):
        assert "keyword.other.marker.lmq" in scopes(tokens, path, line - 1, "lmq")
        assert {"meta.embedded.block.lmq", "string.quoted.double.prompt.lmq",
                "variable.other.hole.lmq"} <= set(scopes(tokens, path, line, hole))
        assert "meta.interpolation.lmq" in scopes(tokens, path, line, parameter)
        assert "keyword.control.clause.lmq" in scopes(tokens, path, line, "where")
        assert "keyword.control.flow.python" in scopes(tokens, path, line + 1, "return")
        assert "punctuation.definition.string.end.lmq" in scopes(tokens, path, line + 2, "'''")
    query = FIXTURES / "query.py"                      # after the docstring: Python again
    plain = scopes(tokens, query, 13, "An ordinary docstring: [NOT_A_HOLE] stays a string.")
    assert not lmq_scopes(plain)
    assert not lmq_scopes(scopes(tokens, query, 14, "[X]"))


def test_examples_have_no_illegal_tokens(tokens):
    for path in (ROOT / "examples").glob("*.lmq"):
        bad = [(n, t) for n, t, s in tokens(path) if any(x.startswith("invalid.") for x in s)]
        assert not bad, f"{path.name}: {bad}"


def test_manifest():
    manifest = json.loads((EXTENSION / "package.json").read_text())
    language, = manifest["contributes"]["languages"]
    assert language["id"] == "lmq" and language["extensions"] == [".lmq"]
    for grammar in manifest["contributes"]["grammars"]:
        assert (EXTENSION / grammar["path"]).is_file()
    injection, = [g for g in manifest["contributes"]["grammars"] if "injectTo" in g]
    assert injection["injectTo"] == ["source.python"]
    grammar = (EXTENSION / "syntaxes" / "lmq.tmLanguage.json").read_text()
    for scope in injection["embeddedLanguages"]:        # the docstring's content is lmq
        assert f'"contentName": "{scope}"' in grammar


def test_playground_copies_are_current():
    """The playground highlights with copies of these grammars and of the engine
    (scripts/vendor-playground.js makes them): they must equal their sources."""
    _node_modules()
    done = subprocess.run(["node", "-e", "process.stdout.write(JSON.stringify("
                           "require('./scripts/vendor-playground.js').copies))"],
                          cwd=EXTENSION, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    static = ROOT / "lmq" / "playground" / "static"
    for target, source in json.loads(done.stdout).items():
        assert (static / target).read_bytes() == Path(source).read_bytes(), \
            f"lmq/playground/static/{target} is stale: run `npm run vendor-playground` in editors/vscode"
