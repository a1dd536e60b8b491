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
    "SPLITS",
    "demo_corpus",
    "write_demo_questions",
    "sample_path",
]

SAMPLE_DIR = Path(__file__).resolve().parent

#: The invented-entity split: questions, corpus and the passage-kind sidecar (see ``README.md`` here).
INVENTED_QUESTIONS = SAMPLE_DIR / "invented_questions.jsonl"
INVENTED_CORPUS = SAMPLE_DIR / "invented_corpus.jsonl"
INVENTED_PASSAGE_KINDS = SAMPLE_DIR / "invented_passage_kinds.json"


#: The demo's two question splits: category name → file (the category travels to predictions and reports).
SPLITS = {"well-known": SAMPLE_DIR / "questions.jsonl", "invented": INVENTED_QUESTIONS}


def write_demo_questions(path: str | Path) -> Path:
    """Both splits in one questions file, each record tagged with its ``category`` (``well-known``/``invented``),
    interleaved (one of each in turn), so the pipeline's seeded split and its train/eval limits, which keep file
    order, draw from both splits alike.

    The file is rewritten only when its content would change, so a repeated demo keeps its manifests valid.
    """
    import itertools
    import json

    per_split = []
    for category, source in SPLITS.items():
        rows = [json.dumps({**json.loads(line), "category": category}, ensure_ascii=False)
                for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        per_split.append(rows)
    lines = [x for group in itertools.zip_longest(*per_split) for x in group if x is not None]
    text = "\n".join(lines) + "\n"
    path = Path(path)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        from dpa_rag.io import write_text

        write_text(path, text)
    return path


def demo_corpus() -> list[Path]:
    """The corpus files of both splits."""
    return [SAMPLE_DIR / "corpus.jsonl", INVENTED_CORPUS]


def sample_path(name: str) -> Path:
    """Path of a bundled sample file (``questions.jsonl``, ``corpus.jsonl``, ``invented_questions.jsonl``, ...)."""
    path = SAMPLE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"bundled sample file {name} not found in {SAMPLE_DIR}")
    return path
