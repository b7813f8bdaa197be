"""`lmq playground` in a real headless browser (Debian's chromium + chromedriver, driven
over WebDriver): the page loads and highlights, a typed query runs on SmolLM2 with its
prompt and values streaming in, a value's token trace opens, a syntax error and a run-time
error are marked at their line, and Stop interrupts a long run. Screenshots go to
$LMQ_TEST_ARTIFACTS (default: pytest's temporary directory)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from webdriver import BACKSPACE, CTRL, NULL, Browser, chromium_paths

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.model


def _install_chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt-get when missing (CI runs
    as root on a fresh machine)."""
    chromium, driver = chromium_paths()
    if chromium and driver:
        return chromium, driver
    apt = shutil.which("apt-get")
    assert apt and os.geteuid() == 0, "the playground tests need Debian's chromium and " \
        "chromium-driver: apt-get install -y chromium chromium-driver"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-qq"], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run([apt, "install", "-y", "-qq", "chromium", "chromium-driver"], env=env,
                   check=True, capture_output=True, timeout=900)
    chromium, driver = chromium_paths()
    assert chromium and driver
    return chromium, driver


@pytest.fixture(scope="module")
def playground():
    """The URL of `lmq playground --port 0`, run as a user runs it."""
    process = subprocess.Popen([sys.executable, "-m", "lmq.cli", "playground", "--port", "0"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert match, line + process.stderr.read()
    yield match.group(0)
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def browser():
    session = Browser(*_install_chromium())
    yield session
    session.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return Path(os.environ.get("LMQ_TEST_ARTIFACTS") or tmp_path_factory.mktemp("playground"))


def open_page(browser, url):
    browser.get(url)
    browser.wait("return document.body.dataset.ready === 'true'")


def type_query(browser, text):
    """Select all in the editor, delete it, and type `text` key by key."""
    browser.type("#source", CTRL + "a" + NULL + BACKSPACE)
    browser.type("#source", text)


def run_and_wait(browser, timeout=240):
    """Click Run and wait for the run to finish; the status line then."""
    runs = browser.execute("return Number(document.body.dataset.runs || 0)")
    browser.click("#run")
    browser.wait("return Number(document.body.dataset.runs || 0) > arguments[0]", timeout, runs)
    return browser.execute("return document.getElementById('status').textContent")


RECORD_STREAMING = """
window.streamed = {tokensWhileRunning: 0};
new MutationObserver((records) => {
  for (const r of records) for (const node of r.addedNodes)
    if (node.classList && node.classList.contains('tok') && node.parentElement.classList.contains('running'))
      window.streamed.tokensWhileRunning++;
}).observe(document.getElementById('prompt'), {childList: true, subtree: true});
"""


def test_page_highlights_loads_examples_and_compiles(browser, playground):
    open_page(browser, playground)
    names = browser.execute("return [...document.querySelectorAll('#examples option')].map(o => o.value)")
    assert {"capital.lmq", "order.lmq", "chat.lmq"} <= set(names)
    browser.execute("const s = document.getElementById('examples'); s.value = 'order.lmq';"
                    "s.dispatchEvent(new Event('change'))")
    assert "[COUNT: int]" in browser.execute("return document.getElementById('source').value")
    classes = browser.execute("""
        const found = {};
        for (const el of document.querySelectorAll('#highlight span')) (found[el.textContent] ||= []).push(el.className);
        return found;""")
    assert any(c.startswith("tok-hole var-") for c in classes["COUNT"])     # coloured by variable
    assert "tok-clause" in classes["where"]
    assert "tok-builtin" in classes["int"]                  # the typed hole's annotation
    assert "tok-keyword" in classes["class"]                 # Python around the prompts
    browser.click(".tabs button[data-tab=compiled]")
    compiled = browser.wait("const t = document.getElementById('compiled').textContent;"
                            "return t.includes('Generated program') && t")
    assert "hole 1: COUNT (line 12)" in compiled and "root ::=" in compiled   # per-hole GBNF
    assert "await _ctx.hole(" in compiled                     # the generated program


def test_typed_query_runs_streams_and_opens_token_trace(browser, playground, artifacts):
    open_page(browser, playground)
    browser.execute("document.getElementById('arguments').value = ''")
    query = ('"Q: What is the capital of France?\\nA:[ANSWER]" where STOPS_AT(ANSWER, ".") '
             'and len(TOKENS(ANSWER)) < 20')
    type_query(browser, query)
    assert browser.execute("return document.getElementById('source').value") == query
    browser.execute(RECORD_STREAMING)
    status = run_and_wait(browser)
    assert status.startswith("done"), status
    assert browser.execute("return window.streamed.tokensWhileRunning") >= 2   # shown before the value
    result = browser.execute("return JSON.parse(document.querySelector('#result pre').textContent)")
    answer = result["variables"]["ANSWER"]
    assert "Paris" in answer
    prompt = browser.execute("return document.getElementById('prompt').textContent")
    assert prompt == result["prompt"]                       # the streamed prompt is the result's
    shown = browser.execute("""
        const v = document.querySelector('#prompt .value');
        const copy = v.cloneNode(true); copy.querySelectorAll('.cut').forEach(c => c.remove());
        return [copy.textContent, v.className];""")
    assert shown[0] == answer and "var-" in shown[1]
    browser.click("#prompt .value")
    rows = browser.wait("const r = document.querySelectorAll('#trace tbody tr'); return r.length && "
                        "[...r].map(tr => [...tr.children].map(td => td.textContent))")
    assert len(rows) == len(result["tokens"]["ANSWER"])
    for number, row in enumerate(rows, 1):
        assert row[0] == str(number)
        assert re.fullmatch(r"[\d,]+ / 49,152", row[5])      # allowed by the mask / vocabulary
        assert row[6] in ("chosen", "forced") and row[7] and row[8]   # alternatives before and after
    assert "where STOPS_AT(ANSWER, '.')" in browser.execute("return document.querySelector('#trace .hole-info').textContent")
    browser.screenshot(artifacts / "playground.png")
    assert (artifacts / "playground.png").stat().st_size > 10_000


def test_nested_query_example(browser, playground):
    """examples/nested.lmq: each nested query's prompt is shown replaced by its value."""
    open_page(browser, playground)
    browser.execute("const s = document.getElementById('examples'); s.value = 'nested.lmq';"
                    "s.dispatchEvent(new Event('change'))")
    status = run_and_wait(browser)
    assert status.startswith("done"), status + browser.execute("return document.getElementById('error').textContent")
    result = browser.execute("return JSON.parse(document.querySelector('#result pre').textContent)")
    assert browser.execute("return document.querySelectorAll('#prompt .nested.replaced').length") == 2
    values = browser.execute("return [...document.querySelectorAll('#prompt .value')].map(v => v.textContent)")
    assert result["variables"]["FIRST"] in values and result["variables"]["SECOND"] in values


@pytest.mark.parametrize("decoder", ["sample(n=2, temperature=0.8, seed=1)", "beam(n=2)"])
def test_branches_each_show_their_prompt(browser, playground, decoder):
    """One prompt per branch; a beam split starts as a copy of its parent up to the split."""
    open_page(browser, playground)
    type_query(browser, decoder + '\n"A colour:[C]" where len(TOKENS(C)) < 3\n')
    assert run_and_wait(browser).startswith("done")
    results = browser.execute("return JSON.parse(document.querySelector('#result pre').textContent)")["results"]
    shown = browser.execute("""
        return [...document.querySelectorAll('#prompt .branch')].map(b => {
          const copy = b.cloneNode(true);
          copy.querySelectorAll('.branch-label, .cut').forEach(e => e.remove());
          return copy.textContent; });""")
    assert sorted(shown) == sorted(r["prompt"] for r in results)


def test_chat_reply_ends_on_the_end_token(browser, playground):
    """A reply that ends on the chat template's end-of-turn token: that token is in the
    trace but not in the value or the prompt."""
    open_page(browser, playground)
    type_query(browser, '"{:user}What is 2+2? Answer with a number.{:assistant}[REPLY]" where len(TOKENS(REPLY)) < 60')
    assert run_and_wait(browser).startswith("done")
    result = browser.execute("return JSON.parse(document.querySelector('#result pre').textContent)")
    value = browser.execute("const v = document.querySelector('#prompt .value');"
                            "return [v.textContent, v.querySelector('.end-token').dataset.label]")
    assert value == [result["variables"]["REPLY"], "<|im_end|>"]
    assert browser.execute("return document.querySelector('#prompt .role').textContent") == "((user)):"


def test_syntax_error_is_marked_at_its_line(browser, playground, artifacts):
    open_page(browser, playground)
    type_query(browser, '"Q: one\\n"\n"A: [ANSWER"\n')
    marked = browser.wait("const g = document.querySelector('#gutter .error');"
                          "return g && [g.dataset.line, document.getElementById('error').textContent]")
    assert marked[0] == "2" and "line 2, column" in marked[1] and "unclosed '['" in marked[1]
    assert browser.execute("return document.querySelector('#highlight .line.error .err-char') !== null")
    browser.screenshot(artifacts / "playground-syntax-error.png")
    type_query(browser, '"Q: one\\n"\n"A: [ANSWER]" where ANSWER in ["a"] and ANSWER == "b"\n')
    marked = browser.wait("const g = document.querySelector('#gutter .error'), e = document.getElementById('error');"
                          "return g && e.textContent.startsWith('Unsatisfiable') && [g.dataset.line, e.textContent]")
    assert marked[0] == "2" and marked[1].startswith("UnsatisfiableConstraint: line 2: ")
    type_query(browser, '"A number: "\nx = 1 / 0\n')           # compiles; fails when it runs
    browser.wait("return document.querySelector('#gutter .error') === null")
    status = run_and_wait(browser)
    assert status.startswith("failed")
    marked = browser.execute("const g = document.querySelector('#gutter .error');"
                             "return g && [g.dataset.line, document.getElementById('error').textContent]")
    assert marked[0] == "2" and "ZeroDivisionError" in marked[1]


def test_stop_interrupts_a_long_run(browser, playground):
    open_page(browser, playground)
    type_query(browser, '"Count to a thousand: 1, 2, 3,[N]" where len(TOKENS(N)) < 3000')
    browser.click("#run")
    browser.wait("return document.querySelectorAll('#prompt .tok').length >= 5", 120)
    browser.click("#stop")
    stopped_at = time.monotonic()
    browser.wait("return !document.getElementById('run').disabled", 30)
    assert time.monotonic() - stopped_at < 10
    status = browser.execute("return document.getElementById('status').textContent")
    assert status.startswith("stopped"), status
    assert browser.execute("return document.querySelector('#prompt .stopped-note') !== null")
    assert browser.execute("return document.querySelectorAll('#prompt .tok').length") < 2999


def test_server_answers_only_its_own_page(playground):
    """Running a query runs Python: requests another site could make are refused."""
    def status(path, method="GET", headers=(), body=None):
        request = urllib.request.Request(playground + path.lstrip("/"), data=body, method=method,
                                         headers=dict(headers))
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    query = json.dumps({"source": '"x = {1/0}"'}).encode()
    assert status("/") == 200 and status("/static/vendor/onig.wasm") == 200
    assert status("/", headers=[("Host", "attacker.example:80")]) == 403           # DNS rebinding
    assert status("/api/run", "POST", [("Content-Type", "application/json"),
                                        ("Origin", "http://attacker.example")], query) == 403
    assert status("/api/run", "POST", [("Content-Type", "text/plain")], query) == 415   # a form post
    assert status("/static/../runs.py") == 404 and status("/static/%2e%2e/runs.py") == 404


def test_concurrent_compiles_each_get_their_own_view(playground):
    """The server answers each request on its own thread: compiles of different queries
    at once must not mix their grammars (they once shared a redirected stdout)."""
    def view(source):
        request = urllib.request.Request(playground + "api/compile", method="POST",
                                         data=json.dumps({"source": source}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    sources = [path.read_text() for path in sorted((ROOT / "examples").glob("*.lmq"))]
    alone = [view(source) for source in sources]
    assert all(len(v["holes"]) and all(h["grammar"].startswith(f"# hole {h['index']}: ")
                                       for h in v["holes"]) for v in alone)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(view, sources * 8))
    assert together == alone * 8


def test_port_out_of_range_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "lmq.cli", "playground", "--port", "70000"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--port must be from 0 to 65535" in done.stderr
