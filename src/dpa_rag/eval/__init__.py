"""Evaluation: pure answer/ranking metrics, prediction-file evaluation, paired bootstrap comparisons, reports."""

from __future__ import annotations

from dpa_rag.eval.bootstrap import paired_bootstrap
from dpa_rag.eval.evaluate import EvaluateConfig, evaluate_predictions, load_predictions
from dpa_rag.eval.metrics import exact_match, f1, hit, hit_word, normalize_answer, score_answer
from dpa_rag.eval.paired import paired_markdown, paired_table, question_scores
from dpa_rag.eval.ranking import canonical_metric, ranking_metrics
from dpa_rag.eval.report import bar_plot, markdown_table, write_report

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
