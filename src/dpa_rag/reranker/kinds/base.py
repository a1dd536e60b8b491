"""The reranker-kind interface (in the spirit of AnswerDotAI/rerankers' ``BaseRanker``): what training, inference
and the model card ask of a kind. One subclass per file in this folder, registered in :mod:`dpa_rag.reranker.kinds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from dpa_rag.reranker.model import inference_scores

__all__ = ["RerankerKind"]


class RerankerKind:
    """One way to build, train, save and score a reranker.

    Attributes:
        name: the registered name (``--kind``).
        warms_up: the relevance warm-up applies (an embedding model already ranks by relevance: it does not).
        embeds: the backbones this kind detects are embedding models (``--warmup-target auto`` then distils from
            the backbone loaded as a bi-encoder).
        zero3_error: why this kind cannot train under DeepSpeed ZeRO-3 (``None``: it can).
    """

    name: ClassVar[str] = ""
    warms_up: ClassVar[bool] = True
    embeds: ClassVar[bool] = False
    zero3_error: ClassVar[str | None] = None

    # --- loading and saving --------------------------------------------------------------------------------------
    def detect(self, backbone: str, path: Path) -> bool:
        """``--kind auto``: whether ``backbone`` (resolved to ``path``, a folder or not) is of this kind."""
        return False

    def owns(self, model: nn.Module) -> bool:
        """Whether a loaded ``model`` is of this kind."""
        return False

    def load_for_training(self, cfg: Any) -> tuple[nn.Module, Any]:
        """The backbone with this kind's head and its tokenizer, from a :class:`TrainRerankerConfig`."""
        raise NotImplementedError

    def load(self, path: str, device: str, dtype: Any, max_length: int,
             score: str | None) -> tuple[nn.Module, Any, str, dict[str, Any]]:
        """A trained model for inference: ``(model, tokenizer, score mode, saved dpa_rag settings)``."""
        raise NotImplementedError

    def save(self, trainer: Any, model: nn.Module, tokenizer: Any, model_dir: Path, main: bool) -> None:
        """Save the trained model to ``model_dir``; called by every process (``main``: the one that writes)."""
        raise NotImplementedError

    def log_fields(self, model: nn.Module) -> dict[str, Any]:
        """Extra entries of ``train_log.json``."""
        return {}

    # --- training ------------------------------------------------------------------------------------------------
    def collator(self, tokenizer: Any, losses: Sequence[Any], max_length: int, query_anchor: bool = False,
                 grouped: bool = False) -> Any:
        """The training collator (``grouped``: groups kept apart and unduplicated, for per-group passes)."""
        raise NotImplementedError

    def train_max_length(self, model: nn.Module, max_length: int) -> int:
        """The truncation length the collator uses."""
        return max_length

    def encode(self, model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None,
               separate: bool = False) -> Any:
        """The :class:`~dpa_rag.reranker.model.EncodeOutput` of a collated batch (``separate``: one forward per
        group)."""
        raise NotImplementedError

    def freeze_unreached(self, model: nn.Module, losses: Sequence[Any]) -> list[str]:
        """Freeze the parameters no enabled loss reaches (DDP without unused-parameter search); returns their names."""
        return []

    # --- scoring -------------------------------------------------------------------------------------------------
    def predict_logits(self, model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
                       max_length: int) -> Tensor:
        """Logits ``[N, num_labels]`` (float32, CPU) of ``(query, passage)`` pairs, in input order."""
        raise NotImplementedError

    def score_pairs(self, model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
                    max_length: int, score: str) -> list[float]:
        """Inference scores (:func:`~dpa_rag.reranker.model.inference_scores` of the logits)."""
        return inference_scores(self.predict_logits(model, tokenizer, pairs, batch_size, max_length), score).tolist()

    # --- model card ----------------------------------------------------------------------------------------------
    def card_fields(self, head: str) -> dict[str, str]:
        """The model card's kind-specific pieces: ``pipeline_tag``, ``tag``, ``description``, ``head_line``,
        ``st_class`` (the sentence-transformers class that loads the folder), ``loads_with`` (a line naming every
        loading class) and ``loader`` (a usage snippet)."""
        raise NotImplementedError
