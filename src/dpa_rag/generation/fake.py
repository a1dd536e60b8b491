"""A deterministic, dependency-free test double for generators (used by tests and offline dry runs)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from dpa_rag.generation.base import GenerationParams, Prompt, prompt_to_text

__all__ = ["FakeGenerator", "first_capitalised_phrase"]

_CAPS = re.compile(r"\b([A-Z][a-z]+(?:\s+[A-Z][a-z]+)*)")
_PREFIX = re.compile(r"^\s*\[\d+\]\s*[^:]*:\s*(.*)$")


def first_capitalised_phrase(prompt: str) -> str:
    """The default fake "reader": the first capitalised phrase of the first passage's text, else "unknown".

    The passage is what follows ``Content:`` (the rendered-passage layout) or the first line after ``Passages:``
    (the reader templates; a ``[1] Title:`` prefix is skipped), so a closed-book prompt answers "unknown" and an
    open-book one copies a name from the passage — enough to make every preference category occur in tests.
    """
    _, sep, rest = prompt.partition("Content:")
    if not sep:
        _, sep, rest = prompt.partition("Passages:")
        if not sep:
            return "unknown"
        first = rest.strip().split("\n", 1)[0]
        m = _PREFIX.match(first)
        rest = m.group(1) if m else first
    m = _CAPS.search(rest)
    return m.group(1) if m else "unknown"


class FakeGenerator:
    """Answers with ``fn(prompt_text)``; counts calls and batches so tests can assert on caching.

    Args:
        fn: maps the prompt's text to the completion (default :func:`first_capitalised_phrase`).
        model_id: identifies the fake in the cache key.
        fail_times: raise ``RuntimeError`` on the first ``fail_times`` calls (to test retry and resume).
    """

    def __init__(self, fn: Callable[[str], str] | None = None, model_id: str = "fake", fail_times: int = 0) -> None:
        self.fn = fn or first_capitalised_phrase
        self.model_id = model_id
        self.calls = 0
        self.batches = 0
        self.fail_times = fail_times

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("fake backend failure")
        self.batches += 1
        self.calls += len(prompts)
        return [self.fn(prompt_to_text(p)) for p in prompts]

    def loglik(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """A deterministic stand-in for teacher-forced scoring: per whitespace token of the continuation, log-prob
        -0.1 if the continuation appears in the prompt's passages (case-insensitive), else -2.0."""
        self.calls += len(prompts)
        out = []
        for p, c in zip(prompts, continuations, strict=True):
            n = max(1, len(c.split()))
            inside = c.strip().lower() in _passages_text(prompt_to_text(p)).lower()
            out.append(((-0.1 if inside else -2.0) * n, n))
        return out


def _passages_text(prompt: str) -> str:
    """What follows ``Passages:``/``Content:`` up to the question (empty for a closed-book prompt)."""
    for marker in ("Passages:", "Content:"):
        _, sep, rest = prompt.partition(marker)
        if sep:
            return rest.split("Question:", 1)[0]
    return ""
