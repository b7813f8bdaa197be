"""The `llama-server` binary: found ($LLAMA_SERVER, PATH, lmq's cache) or built once per
machine from the llama.cpp sources that the installed llama-cpp-python's sdist vendors.

`lmq install-llama-server` downloads that sdist from PyPI (`pip download`, the only
network access), configures llama.cpp with nothing that reaches the network at build
time (no prebuilt web UI, no curl, no OpenSSL) and builds the `llama-server` target. The
binary is cached under `$LMQ_CACHE_DIR` (default `~/.cache/lmq`) as
`llama-server/<version>/llama-server`, so the server runs exactly the llama.cpp that lmq
runs in process, and the build (minutes on two cores) is paid once per machine. A lock
file lets concurrent installs (two test runs) share one build.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from lmq.errors import ModelError

BINARY_NAME = "llama-server"
#: llama.cpp build options: portable code, a static binary, nothing fetched while building
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (the sources the binary is built from)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise ModelError("llama-cpp-python is not installed, so lmq cannot tell which llama.cpp "
                         "to build llama-server from") from None


def cache_dir() -> str:
    """lmq's per-machine cache: $LMQ_CACHE_DIR, else $XDG_CACHE_HOME/lmq, else ~/.cache/lmq."""
    explicit = os.environ.get("LMQ_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmq")


def cached_binary(version: str | None = None) -> str:
    """Where `install` puts the binary built from `version` (default: the installed one)."""
    return os.path.join(cache_dir(), BINARY_NAME, version or llama_cpp_version(), BINARY_NAME)


def find_binary() -> str | None:
    """The llama-server to run: $LLAMA_SERVER, else one on PATH, else lmq's cached build."""
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ModelError(f"$LLAMA_SERVER is {explicit!r}, which is not an executable file")
        return explicit
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return on_path
    cached = cached_binary()
    return cached if os.access(cached, os.X_OK) else None


def require_binary() -> str:
    """`find_binary()`, or a ModelError saying how to get one."""
    found = find_binary()
    if found is None:
        raise ModelError("llama-server was not found ($LLAMA_SERVER, PATH, or lmq's cache at "
                         f"{cached_binary()}): run `lmq install-llama-server` (builds it once, "
                         "a few minutes)")
    return found


def install(jobs: int = 2, log=sys.stderr) -> str:
    """The cached binary for the installed llama-cpp-python, built first if missing."""
    version = llama_cpp_version()
    target = cached_binary(version)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # a concurrent install builds, this one waits
        if os.access(target, os.X_OK):
            return target
        with tempfile.TemporaryDirectory(prefix="lmq-llama-server-") as work:
            source = _download_sources(version, work, log)
            built = _build(source, os.path.join(work, "build"), jobs, log)
            partial = target + ".partial"
            shutil.copy2(built, partial)
            os.replace(partial, target)             # never a half-copied binary in the cache
    print(f"llama-server {version} installed at {target}", file=log)
    return target


def _download_sources(version: str, work: str, log) -> str:
    """llama.cpp's source tree from the llama-cpp-python sdist of `version` (PyPI)."""
    print(f"downloading the llama-cpp-python {version} sdist from PyPI …", file=log)
    _step([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
           "--no-binary", ":all:", "--no-deps", "-d", work],
          "pip download", log)
    archives = [name for name in os.listdir(work) if name.endswith(".tar.gz")]
    if not archives:
        raise ModelError(f"pip download left no sdist of llama-cpp-python {version} in {work}")
    with tarfile.open(os.path.join(work, archives[0])) as archive:
        archive.extractall(work, filter="data")
    source = os.path.join(work, archives[0][:-len(".tar.gz")], "vendor", "llama.cpp")
    if not os.path.isfile(os.path.join(source, "CMakeLists.txt")):
        raise ModelError(f"the llama-cpp-python {version} sdist holds no vendor/llama.cpp sources")
    return source


def _build(source: str, build: str, jobs: int, log) -> str:
    cmake = _cmake(log)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama-server with {jobs} jobs (several minutes) …", file=log)
    _step([cmake, "-S", source, "-B", build, *generator, *CMAKE_OPTIONS], "cmake configure", log)
    _step([cmake, "--build", build, "--target", BINARY_NAME, "-j", str(jobs)], "cmake build", log)
    binary = os.path.join(build, "bin", BINARY_NAME)
    if not os.access(binary, os.X_OK):
        raise ModelError(f"the llama.cpp build finished without {binary}")
    return binary


def _cmake(log) -> str:
    """cmake from PATH, else the PyPI package's (installed into this environment, as
    llama-cpp-python's own build gets it: the machine needs only a C++ compiler)."""
    found = shutil.which("cmake") or shutil.which("cmake", path=os.path.dirname(sys.executable))
    if found is None:
        print("no cmake on PATH: installing the cmake package from PyPI …", file=log)
        _step([sys.executable, "-m", "pip", "install", "cmake"], "pip install cmake", log)
        found = shutil.which("cmake", path=os.path.dirname(sys.executable))
    if found is None:
        raise ModelError("building llama-server needs cmake and a C++ compiler (apt-get install "
                         "cmake g++, or pip install cmake)")
    return found


def _step(command: list[str], what: str, log) -> None:
    """Run one install step; its output goes to the log only when it fails."""
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], file=log)
        raise ModelError(f"{what} failed (exit {done.returncode}): {' '.join(command[:6])} …")
