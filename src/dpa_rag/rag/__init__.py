"""Baseline RAG reading: answer questions from their top-k passages (or closed-book) with a prompt template."""

from __future__ import annotations

from dpa_rag.rag.answer import AnswerConfig, AnswerOutputs, answer_records, build_prompts

__all__ = ["AnswerConfig", "AnswerOutputs", "answer_records", "build_prompts"]
