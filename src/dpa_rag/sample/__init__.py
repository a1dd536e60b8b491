"""The bundled demo sample: ~100 well-known-fact questions and a few hundred passages written for this project."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_DIR", "sample_path"]

SAMPLE_DIR = Path(__file__).resolve().parent


def sample_path(name: str) -> Path:
    """Path of a bundled sample file (``questions.jsonl`` or ``corpus.jsonl``)."""
    path = SAMPLE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"bundled sample file {name} not found in {SAMPLE_DIR}")
    return path
