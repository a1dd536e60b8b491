"""Baseline RAG reading: answer questions from their top-k passages (or closed-book) with a prompt template."""

from __future__ import annotations

from dpa_rag.rag.answer import AnswerConfig, answer_records, build_prompts, run_answer

__all__ = ["AnswerConfig", "answer_records", "build_prompts", "run_answer"]
