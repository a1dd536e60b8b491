"""Evaluation: pure answer/ranking metrics, prediction-file evaluation, paired bootstrap comparisons, reports.

The names below are imported on first use, so ``import dpa_rag.eval.metrics`` (the pure metrics, on the bottom
layer) does not load the ``evaluate`` stage.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EvaluateConfig",
    "bar_plot",
    "canonical_metric",
    "evaluate_predictions",
    "exact_match",
    "f1",
    "hit",
    "hit_word",
    "load_predictions",
    "markdown_table",
    "normalize_answer",
    "paired_bootstrap",
    "paired_markdown",
    "paired_table",
    "question_scores",
    "ranking_metrics",
    "score_answer",
    "write_report",
]

_WHERE = {
    "paired_bootstrap": "dpa_rag.eval.bootstrap",
    "EvaluateConfig": "dpa_rag.eval.evaluate",
    "evaluate_predictions": "dpa_rag.eval.evaluate",
    "load_predictions": "dpa_rag.eval.evaluate",
    **dict.fromkeys(("exact_match", "f1", "hit", "hit_word", "normalize_answer", "score_answer"),
                    "dpa_rag.eval.metrics"),
    **dict.fromkeys(("paired_markdown", "paired_table", "question_scores"), "dpa_rag.eval.paired"),
    **dict.fromkeys(("canonical_metric", "ranking_metrics"), "dpa_rag.eval.ranking"),
    **dict.fromkeys(("bar_plot", "markdown_table", "write_report"), "dpa_rag.eval.report"),
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dpa_rag.eval' has no attribute {name!r}")
