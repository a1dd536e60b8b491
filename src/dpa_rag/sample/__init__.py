"""The bundled demo sample, written for this project.

Two splits share this folder:

* the well-known-fact split: ~100 questions (``questions.jsonl``) and a few hundred passages (``corpus.jsonl``);
* the invented-entity split: 120 questions about fictional people, places and things (``invented_questions.jsonl``)
  and their passages (``invented_corpus.jsonl``), which cannot be answered closed-book.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "INVENTED_CORPUS",
    "INVENTED_PASSAGE_KINDS",
    "INVENTED_QUESTIONS",
    "SAMPLE_DIR",
    "sample_path",
]

SAMPLE_DIR = Path(__file__).resolve().parent

#: The invented-entity split: questions, corpus and the passage-kind sidecar (see ``README.md`` here).
INVENTED_QUESTIONS = SAMPLE_DIR / "invented_questions.jsonl"
INVENTED_CORPUS = SAMPLE_DIR / "invented_corpus.jsonl"
INVENTED_PASSAGE_KINDS = SAMPLE_DIR / "invented_passage_kinds.json"


def sample_path(name: str) -> Path:
    """Path of a bundled sample file (``questions.jsonl``, ``corpus.jsonl``, ``invented_questions.jsonl``, ...)."""
    path = SAMPLE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"bundled sample file {name} not found in {SAMPLE_DIR}")
    return path
