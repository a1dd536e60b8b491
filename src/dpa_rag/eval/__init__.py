"""Evaluation: pure answer/ranking metrics, prediction-file evaluation, markdown/JSON/plot reports."""

from __future__ import annotations

from dpa_rag.eval.evaluate import EvaluateConfig, evaluate_predictions, load_predictions, run_evaluate
from dpa_rag.eval.metrics import exact_match, f1, hit, hit_word, normalize_answer, score_answer
from dpa_rag.eval.report import bar_plot, markdown_table, write_report

__all__ = [
    "EvaluateConfig",
    "bar_plot",
    "evaluate_predictions",
    "exact_match",
    "f1",
    "hit",
    "hit_word",
    "load_predictions",
    "markdown_table",
    "normalize_answer",
    "run_evaluate",
    "score_answer",
    "write_report",
]
