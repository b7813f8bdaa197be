"""The files the constraint engine keeps between runs, under `$XDG_CACHE_HOME/lmq` (else
`~/.cache/lmq`): vocabulary indexes (`vocabulary_index`) and compiled grammars
(`grammar_cache`).

A file is written to a temporary name and renamed into place, so a concurrent reader
sees either no file or a complete one; a file that cannot be read is rebuilt and
rewritten, one that cannot be written is skipped: the cache saves time, it is never
needed.

Small entries made during a compile are written behind it (`write_behind`): creating,
writing and renaming two files cost a third of a JSON schema's cold compile, and the
disk's latency varies more than the compile itself. One worker thread writes them in
order; until it has, `read` answers them from memory, `flush` waits for them (as
`clear_caches` does), and the process waits for them at exit. A forked child does not
inherit them: its parent writes them. Where no thread may start, entries are written in
line.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
import warnings
from typing import BinaryIO, Callable


def cache_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmq")


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)`: to a temporary file in its directory, then
    renamed over it (nothing is written when the directory cannot be made)."""
    directory = os.path.dirname(path)
    try:
        try:
            handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        except FileNotFoundError:        # made only when missing: a mkdir costs as much as a write
            os.makedirs(directory, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass


#: entries not yet written: path -> what makes its bytes (in the order they were queued)
_pending: dict[str, Callable[[], bytes]] = {}
_changed = threading.Condition()
_worker: threading.Thread | None = None


def write_behind(path: str, contents: Callable[[], bytes]) -> None:
    """Write `contents()` to `path` atomically on the writer thread (`contents` runs
    there too, so encoding an entry is off the caller's path as well; it must not depend
    on state that changes after this call)."""
    global _worker
    with _changed:
        if _worker is None:
            worker = threading.Thread(target=_write_pending, name="lmq-disk-cache", daemon=True)
            try:
                worker.start()
                _worker = worker
            except RuntimeError:            # no thread may start here: written in line
                pass
        if _worker is not None:
            _pending[path] = contents
            _changed.notify_all()
            return
    write_atomically(path, lambda f: f.write(contents()))


def read(path: str) -> bytes | None:
    """The bytes of `path`: a pending entry's from memory, else the file's (None when
    it cannot be read)."""
    with _changed:
        contents = _pending.get(path)
    if contents is not None:
        return contents()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def flush() -> None:
    """Wait until every entry queued so far is on disk (or skipped)."""
    with _changed:
        while _pending:
            _changed.wait()


def _write_pending() -> None:
    while True:
        with _changed:
            while not _pending:
                _changed.wait()
            path, contents = next(iter(_pending.items()))
        try:
            data = contents()
        except Exception as error:          # a bug, told; the worker goes on with the rest
            warnings.warn(f"lmq did not cache {path}: {error!r}", RuntimeWarning)
        else:
            write_atomically(path, lambda f: f.write(data))
        with _changed:
            if _pending.get(path) is contents:      # not queued again meanwhile
                del _pending[path]
            _changed.notify_all()


def _forget_in_child() -> None:
    """After a fork: the writer thread is the parent's, and so are its pending entries."""
    global _changed, _worker
    _pending.clear()
    _changed = threading.Condition()
    _worker = None


atexit.register(flush)
if hasattr(os, "register_at_fork"):                # not on Windows
    os.register_at_fork(after_in_child=_forget_in_child)
