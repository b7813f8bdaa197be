"""The environment of a subprocess running the lmq under test: its source first on
PYTHONPATH, whatever PYTHONPATH already held after it (a machine may provide lmq's
dependencies that way), from any working directory."""

import os

import lmq

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(lmq.__file__)))


def lmq_env(**extra: str) -> dict[str, str]:
    """os.environ with the lmq under test first on PYTHONPATH, plus `extra`."""
    path = os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
