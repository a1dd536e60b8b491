"""NLI consistency scoring with any MNLI-style sequence-classification checkpoint (method.md §5, §12 #8).

The premise is the original question, the hypothesis the rewrite. Label names come from the checkpoint's
``config.id2label`` (a case-insensitive match of ``entail``, ``neutral`` and ``contradict``), never from a
hard-coded order. The model is loaded once and run in batches under ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from tqdm.auto import tqdm

from dpa_rag.models import pick_device

__all__ = ["NLI_LABELS", "NLIScorer", "label_indices", "nli_decision"]

logger = logging.getLogger(__name__)

NLI_LABELS = ("entailment", "neutral", "contradiction")
_KEYS = {"entailment": "entail", "neutral": "neutral", "contradiction": "contradict"}


def _names(label: str, key: str) -> bool:
    """Whether a label names ``key`` (case-insensitive; "not_entailment"/"non-entailment" do not name entailment)."""
    words = re.findall(r"[a-z]+", label.lower())
    return any(w.startswith(key) and (i == 0 or words[i - 1] not in ("not", "non")) for i, w in enumerate(words))


def label_indices(id2label: dict[int, str] | dict[str, str]) -> dict[str, int]:
    """Map ``entailment``/``neutral``/``contradiction`` to the checkpoint's output indices.

    A label names a class when one of its words starts with ``entail``, ``neutral`` or ``contradict`` (any case);
    ``not_entailment`` is not entailment.

    Raises:
        ValueError: entailment or contradiction is not among the labels (``neutral`` is optional, for two-way
            checkpoints with entailment/contradiction), or a name matches two labels.
    """
    out: dict[str, int] = {}
    for canon, key in _KEYS.items():
        hits = [int(i) for i, name in id2label.items() if _names(str(name), key)]
        if len(hits) > 1:
            raise ValueError(f"NLI labels are ambiguous: '{key}' matches several of {dict(id2label)}")
        if hits:
            out[canon] = hits[0]
    missing = [c for c in ("entailment", "contradiction") if c not in out]
    if missing:
        raise ValueError(
            f"the NLI checkpoint's id2label {dict(id2label)} has no {' or '.join(missing)} label; use an MNLI-style "
            "checkpoint whose config names its labels (entailment, neutral, contradiction)"
        )
    return out


def nli_decision(
    probs: dict[str, float], require_entailment: bool = False, contradiction_threshold: float | None = None
) -> str | None:
    """Why a rewrite is dropped, or ``None`` to keep it.

    Rules: by default drop iff contradiction is the argmax (the authors' rule, applied per rewrite). With
    ``contradiction_threshold`` drop iff p(contradiction) ≥ threshold instead. With ``require_entailment`` also drop
    unless entailment is the argmax.

    Args:
        probs: ``{label: probability}`` over the checkpoint's labels (canonical names).
        require_entailment: keep only rewrites the model judges entailed.
        contradiction_threshold: probability threshold replacing the argmax contradiction rule.
    """
    top = max(probs, key=probs.__getitem__)
    if contradiction_threshold is not None:
        if probs.get("contradiction", 0.0) >= contradiction_threshold:
            return "contradiction"
    elif top == "contradiction":
        return "contradiction"
    if require_entailment and top != "entailment":
        return "not_entailment"
    return None


class NLIScorer:
    """A sequence-classification NLI model, loaded once.

    Args:
        model: hub id or local folder of an MNLI-style checkpoint.
        device: ``auto``, ``cpu``, ``cuda``…
        batch_size: pairs per forward pass.
        max_length: truncation length of premise + hypothesis.
    """

    def __init__(self, model: str, device: str = "auto", batch_size: int = 32, max_length: int = 256) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = pick_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(model).to(self.device).eval()
        self.labels = label_indices(self.model.config.id2label)
        logger.info("NLI model %s on %s, labels %s", model, self.device, self.labels)

    def score(
        self, premises: Sequence[str], hypotheses: Sequence[str], progress: bool = False
    ) -> list[dict[str, float]]:
        """``{label: probability}`` (canonical label names) for each (premise, hypothesis) pair, in order."""
        import torch

        if len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
        out: list[dict[str, float]] = []
        steps = range(0, len(premises), self.batch_size)
        with torch.inference_mode():
            for start in tqdm(steps, desc="nli", unit="batch", disable=not progress, leave=False):
                enc = self.tokenizer(
                    list(premises[start : start + self.batch_size]),
                    list(hypotheses[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu()
                for row in probs:
                    out.append({name: round(float(row[i]), 6) for name, i in self.labels.items()})
        return out
