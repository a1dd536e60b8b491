"""Token counts for the OpenAI ``usage`` blocks, with the reader's own tokenizer.

The prompt is counted as the reader sees it (chat messages through the tokenizer's chat template with the generation
prompt, as :class:`~dpa_rag.generation.hf.HFGenerator` renders them; plain text as it is), the completion as the
reader's raw output. A reader whose tokenizer cannot be loaded here (a model behind ``--backend openai`` named by a
remote id) gets no counts: the ``usage`` block is then left out rather than made up.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["TokenCounter"]

logger = logging.getLogger(__name__)


class TokenCounter:
    """Counts tokens with the tokenizer of ``model`` (loaded on first use, once; ``None`` counts if it can't be)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._tokenizer: Any = None
        self._loaded = False
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                try:
                    from transformers import AutoTokenizer

                    from dpa_rag.models import resolve_llm

                    self._tokenizer = AutoTokenizer.from_pretrained(resolve_llm(self.model))
                except Exception as exc:  # a remote model id, no network: no usage block
                    logger.info("no tokenizer for %s (%s): answers carry no usage counts", self.model, exc)
        return self._tokenizer

    def prompt(self, prompt: str | list[dict[str, str]]) -> int | None:
        """Tokens of the prompt as the reader sees it."""
        tok = self._load()
        if tok is None:
            return None
        if isinstance(prompt, str):
            return len(tok(prompt)["input_ids"])
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
            return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return len(tok("\n\n".join(m["content"] for m in prompt))["input_ids"])

    def completion(self, text: str) -> int | None:
        """Tokens of the reader's output."""
        tok = self._load()
        return None if tok is None else len(tok(text, add_special_tokens=False)["input_ids"])
