"""Tiny hand-made records shared by the tests (the tiny models are fixtures in ``tests/conftest.py``).

Importable as ``toys`` from every test folder (pytest puts ``tests/`` on ``sys.path`` for its ``conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

from dpa_rag.io import write_jsonl
from dpa_rag.reranker.losses.registry import LOSS_NAMES

__all__ = ["CITIES", "LOSSES", "NAMES", "authors_train_records", "authors_valid_pairs", "city_question",
           "city_retrieval", "write_rows"]

LOSSES = list(LOSS_NAMES)
CITIES = ["paris", "london", "berlin", "rome", "madrid", "tokyo", "oslo", "lima"]
NAMES = ["Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo", "Vienna", "Dublin", "Prague"]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines; returns ``path``."""
    write_jsonl(path, rows)
    return path


def authors_train_records(n: int = 6) -> list[dict]:
    """Reranker training records in the authors' format, separable: the positive passages repeat the question's
    city word, the negatives talk about other things."""
    out = []
    for i in range(n):
        c, o = CITIES[i % len(CITIES)], CITIES[(i + 3) % len(CITIES)]
        pos = [f"Title: {c} Content: {c} is the capital city of the country {c}", f"Title: {c} Content: the {c} city"]
        neg = [f"Title: {o} Content: the {o} river and the king", "Title: moon Content: the moon and the sun"]
        out.append({"query": f"what is the capital city {c}", "classification": {"text": pos[0], "label": 1},
                    "rank_list": [pos[0], pos[1], neg[0], neg[1]], "positive": pos, "negative": neg})
    return out


def authors_valid_pairs(n: int = 4) -> list[dict]:
    """Validation pairs in the authors' format (category 1 = aligned, 2 = unaligned, alternating)."""
    return [{"question": f"what is the capital city {c}", "reference": [c], "category": 1 + i % 2,
             "ctx": f"Title: {c} Content: {c} is the capital city"} for i, c in enumerate(CITIES[:n])]


def city_question(i: int) -> str:
    return f"what is city number {i}"


def city_retrieval(path: Path, n: int = 10, has_answer: bool = False) -> Path:
    """A DPR-style retrieval file for mining: question i has gold ``NAMES[i]`` and 4 ctxs, two that name the gold
    city and two that name another, in an order that depends on i (``has_answer``: with DPR's flags)."""
    flag = (lambda v: {"has_answer": v}) if has_answer else (lambda v: {})
    records = []
    for i in range(n):
        gold, wrong = NAMES[i % len(NAMES)], NAMES[(i + 1) % len(NAMES)]
        good = [{"title": f"Doc {i} {j}", "text": f"{gold} is the city you want, note {j}.", **flag(True)}
                for j in range(2)]
        bad = [{"title": f"Other {i} {j}", "text": f"{wrong} is a different city, note {j}.", **flag(False)}
               for j in range(2)]
        ctxs = [good[0], bad[0], good[1], bad[1]] if i % 3 else [bad[0], good[0], bad[1], good[1]]
        records.append({"id": f"q{i}", "question": city_question(i), "answers": [gold], "ctxs": ctxs})
    return write_rows(path, records)
