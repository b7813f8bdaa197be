"""Where the shared vocabulary-only GGUFs are: `shared/vocab/` beside the repository
(as on a developer machine and in CI)."""

from pathlib import Path

VOCAB_DIR = Path(__file__).resolve().parents[2] / "shared" / "vocab"


def vocab(family: str) -> str:
    """The path of `ggml-vocab-<family>.gguf`."""
    return str(VOCAB_DIR / f"ggml-vocab-{family}.gguf")
