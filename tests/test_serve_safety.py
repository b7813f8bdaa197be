"""`lmq serve-model`'s safe defaults, on a real subprocess: a client may name only the
served model and the GGUF files of `--models-dir`; every other id (a missing path, a
directory, a FIFO, a text file, a symlink out of the directory, `../`) gets one uniform
answer and never blocks the server; client text is escaped in the log; errors are answers
on their stream, never a closed connection."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from lmq.backends import default_model_path
from lmtp_harness import RawClient, ServerProcess

pytestmark = pytest.mark.model

PATH = default_model_path()
MODEL = "llama.cpp:" + PATH


def _second_copy(target: str) -> None:
    """Another file with the served model's bytes (a hard link where the filesystem allows)."""
    try:
        os.link(PATH, target)
    except OSError:
        shutil.copyfile(PATH, target)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """models/ (the --models-dir) and outside/, each holding every kind of probe."""
    root = tmp_path_factory.mktemp("serve-safety")
    models, outside = root / "models", root / "outside"
    for directory in (models, outside):
        directory.mkdir()
        (directory / "text.gguf").write_text("not a model\n")
        (directory / "dir.gguf").mkdir()
        os.mkfifo(directory / "fifo.gguf")
        os.symlink(PATH, directory / "served.gguf")
    (models / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 but nothing else")
    _second_copy(str(models / "copy.gguf"))
    _second_copy(str(outside / "other.gguf"))
    os.symlink(outside / "other.gguf", models / "escape.gguf")
    return models, outside


@pytest.fixture(scope="module")
def server(layout):
    process = ServerProcess(MODEL, "--models-dir", str(layout[0]), "--max-models", "2",
                            "--n_ctx=256", "--slots", "2", cwd=str(layout[1]))
    yield process
    try:
        assert process.terminate(30) == 0          # no FIFO holds it up
    finally:
        process.kill()


@pytest.fixture
def client(server):
    connection = RawClient(server.url)
    yield connection
    connection.close()


def model_info(client, model, stream_id=1, timeout=30):
    client.send("MODEL_INFO", {"model": model, "stream_id": stream_id})
    kind, [element] = client.frame(timeout)
    assert kind == "MSG" and element["stream_id"] == stream_id
    return element


def probes(models, outside):
    """Ids that name no model a client may use, each a different filesystem case."""
    return [f"llama.cpp:{outside}/missing.gguf", f"llama.cpp:{outside}/text.gguf",
            f"llama.cpp:{outside}/dir.gguf", f"llama.cpp:{outside}/fifo.gguf",
            f"llama.cpp:{outside}/served.gguf", f"llama.cpp:{outside}/other.gguf",
            "llama.cpp:missing.gguf", "llama.cpp:text.gguf", "llama.cpp:dir.gguf",
            "llama.cpp:fifo.gguf", "llama.cpp:broken.gguf", "llama.cpp:escape.gguf",
            "llama.cpp:../outside/other.gguf", f"llama.cpp:{models}/../outside/text.gguf",
            "llama.cpp:" + "../" * 20 + "etc/passwd", "llama.cpp:/dev/zero", "llama.cpp:.",
            "local:llama.cpp:./other.gguf", "transformers:gpt2", "gpt2", "llama.cpp:nul\x00.gguf"]


def test_filesystem_probes_get_one_uniform_answer(server, client, layout):
    started = time.monotonic()
    for stream_id, model in enumerate(probes(*layout), 1):
        element = model_info(client, model, stream_id)
        assert element == {"stream_id": stream_id, "error": f"model {model!r} is not served here"}
        client.send("GENERATE", {"model": model, "prompt": [1, 2], "stream_id": stream_id})
        kind, [element] = client.frame(30)
        assert kind == "TOKEN" and element["error"] == f"model {model!r} is not served here"
    assert time.monotonic() - started < 60           # the FIFOs were never opened
    assert model_info(client, MODEL)["model_info"]["context_size"] == 256
    log = "".join(server.log)
    assert "refused model" in log and "is not a regular file" in log      # the reasons: log only


def test_models_dir_serves_its_ggufs_and_a_symlink_reuses_the_served_model(server, client, layout):
    models, _ = layout
    prompt = [1, 504, 3458, 282]
    start = model_info(client, MODEL)["model_info"]["generated_tokens"]
    expected = [e["token"] for e in client.generate(MODEL, prompt, max_tokens=3)]
    copy = model_info(client, "llama.cpp:copy.gguf", timeout=120)["model_info"]   # loads now
    assert copy["tokenizer_gguf"] == os.path.realpath(models / "copy.gguf")
    assert copy["generated_tokens"] == 0 and copy["context_size"] == 256     # with the flags
    assert [e["token"] for e in client.generate(f"local:llama.cpp:{models}/./copy.gguf", prompt,
                                                stream_id=2, max_tokens=3)] == expected
    before = model_info(client, MODEL)["model_info"]["generated_tokens"]
    linked = model_info(client, "llama.cpp:served.gguf")["model_info"]
    assert linked["tokenizer_gguf"] == os.path.realpath(PATH) and linked["generated_tokens"] == before
    client.generate("llama.cpp:served.gguf", prompt, stream_id=3, max_tokens=3)
    after = model_info(client, MODEL)["model_info"]["generated_tokens"]
    assert after - before == before - start > 0         # the link's tokens ran on the served model
    _second_copy(str(models / "third.gguf"))
    try:
        assert "--max-models" in model_info(client, "llama.cpp:third.gguf")["error"]
    finally:
        os.remove(models / "third.gguf")


def test_client_text_is_escaped_in_the_log(server, client):
    hostile = "llama.cpp:x\n\x1b[31mlmq serve-model: listening on ws://evil/\x1b[0m\r\x07.gguf"
    long = "llama.cpp:" + "a" * 100_000
    for model in (hostile, long):
        assert "not served here" in model_info(client, model)["error"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in server.log if "refused model 'llama.cpp:" + "a" * 20 in line
                 or "ws://evil" in line]
        if len(lines) >= 2:
            break
        time.sleep(0.1)
    assert len(lines) == 2 and all("refused model" in line for line in lines)   # one line each
    assert repr(hostile) in lines[0]
    assert not any(c in "".join(server.log) for c in "\x1b\r\x07")
    assert len(lines[1]) < 2000 and "(99810 more characters)" in lines[1]


def test_errors_are_answers_and_the_connection_lives_on(client):
    prompt = [1, 504, 3458, 282]
    random = client.generate(MODEL, prompt, stream_id=1, max_tokens=2, temperature=1.0, seed=-1)
    assert random[-1]["finish_reason"] == "length"
    [element] = client.generate(MODEL, prompt, stream_id=2, seed=-2)
    assert "seed" in element["error"] and "at least -1" in element["error"]
    [element] = client.generate(MODEL, prompt, stream_id=3, seed=2 ** 70)
    assert "seed" in element["error"]
    assert client.generate(MODEL, prompt, stream_id=4, max_tokens=1)[0]["finish_reason"] == "length"


def test_non_loopback_host_starts_with_insecure_no_token(layout):
    server = ServerProcess(None, "--models-dir", str(layout[0]), "--host", "0.0.0.0",
                           "--insecure-no-token")
    try:
        assert server.url.startswith("ws://0.0.0.0:")
        assert server.terminate() == 0
        assert any("WARNING: no --token" in line for line in server.log)
    finally:
        server.kill()


@pytest.mark.parametrize("args,words", [
    ([MODEL, "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines"),
    ([MODEL, "--host", "::"], "--token SECRET"),
    (["--models-dir", "/nonexistent-lmq-dir"], "is not a directory"),
    ([MODEL, "--static", "--models-dir", "/tmp"], "pick one"),
])
def test_unsafe_command_lines_refuse_before_loading(args, words):
    process = subprocess.run([sys.executable, "-m", "lmq.cli", "serve-model", *args],
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 2 and words in process.stderr, process.stderr
    assert "loading" not in process.stderr
