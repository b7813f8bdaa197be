"""Every examples/*.lmq runs as is on the default model (through the CLI)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARGS = {"translate.lmq": ["--arg", "word=cat", "--arg", "language=French"]}

pytestmark = pytest.mark.model


def run(name):
    done = subprocess.run([sys.executable, "-m", "lmq.cli", "run", str(EXAMPLES / name), "--json",
                           *ARGS.get(name, [])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_example_is_tested():
    tested = {"capital.lmq", "shopping_list.lmq", "chat.lmq", "nested.lmq", "translate.lmq",
              "order.lmq"}
    assert {p.name for p in EXAMPLES.glob("*.lmq")} == tested


def test_capital():
    answer = run("capital.lmq")["return"]
    assert "Paris" in answer and answer.endswith(".")


def test_shopping_list():
    items = run("shopping_list.lmq")["return"]
    assert len(items) == 4 and all(item and "\n" not in item for item in items)


def test_chat():
    result = run("chat.lmq")
    assert "<|im_start|>assistant\n" + result["variables"]["REPLY"] in result["prompt"]
    assert len(result["tokens"]["REPLY"]) < 40


def test_nested():
    result = run("nested.lmq")
    first, second = result["variables"]["FIRST"], result["variables"]["SECOND"]
    assert result["prompt"] == (f"Trivia night.\nFirst answer: {first}\nSecond answer: {second}\n")
    assert "Q:" not in result["prompt"]          # the nested prompts were replaced by values


def test_translate():
    result = run("translate.lmq")
    assert result["prompt"].startswith("Translate English words to French.\nEnglish: dog\nFrench: chien\n")
    assert "\n" not in result["variables"]["TRANSLATION"]


def test_order():
    order = run("order.lmq")["return"]
    assert order["size"] in ("small", "medium", "large")
    assert isinstance(order["count"], int)
    assert re.fullmatch(r"[0-2][0-9]:[0-5][0-9]", order["time"])
    assert isinstance(order["customer"], str)
