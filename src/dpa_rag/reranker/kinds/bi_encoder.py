"""The bi-encoder kind: a sentence-transformers embedding model scoring ``s · cos(E(q), E(d)) + b`` (method.md §13;
the model, its collator and encoder in :mod:`dpa_rag.reranker.biencoder`); saved as a sentence-transformers folder
plus ``dpa_rag_reranker.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dpa_rag.reranker.biencoder import (
    BiEncoderCollator,
    BiEncoderReranker,
    encode_bi,
    encode_bi_groups,
    is_biencoder_folder,
    is_embedding_model,
    load_biencoder,
    score_bi,
    unwrap_biencoder,
)
from dpa_rag.reranker.kinds.base import RerankerKind

__all__ = ["BiEncoderKind"]


class BiEncoderKind(RerankerKind):
    """Query and passage embedded apart; the score is their scaled cosine (starts at the dense retriever's quality)."""

    name = "bi-encoder"
    warms_up = False  # an embedding model already ranks by relevance: nothing to warm up
    embeds = True
    zero3_error = ("the bi-encoder kind saves its sentence-transformers model from the process's own weights, which "
                   "DeepSpeed ZeRO-3 partitions; use ZeRO stage 1/2 or plain DDP (accelerate launch)")

    def detect(self, backbone: str, path: Path) -> bool:
        """An embedding model: a sentence-transformers folder without a classification head (e.g. the bundled
        MiniLM) or a folder saved as a bi-encoder reranker; a hub id is looked up in the local hub cache only."""
        if path.is_dir():
            return is_biencoder_folder(path) or is_embedding_model(path)
        try:
            from huggingface_hub import try_to_load_from_cache

            modules = try_to_load_from_cache(str(backbone), "modules.json")
            config = try_to_load_from_cache(str(backbone), "config.json")
        except Exception:  # noqa: BLE001 - an unusual id: fall back to the paper's default
            return False
        return isinstance(modules, str) and isinstance(config, str) and is_embedding_model(Path(modules).parent)

    def owns(self, model: nn.Module) -> bool:
        return isinstance(unwrap_biencoder(model), BiEncoderReranker)

    def load_for_training(self, cfg: Any) -> tuple[nn.Module, Any]:
        """The embedding model with the initial ``--bi-scale`` ``s`` and bias ``-s/2``."""
        model = load_biencoder(cfg.backbone, max_length=cfg.max_length)
        model.log_scale.data.fill_(math.log(cfg.bi_scale))
        model.bias.data.fill_(-cfg.bi_scale / 2)
        return model, model.tokenizer

    def load(self, path: str, device: str, dtype: Any, max_length: int,
             score: str | None) -> tuple[nn.Module, Any, str, dict[str, Any]]:
        model = load_biencoder(path, device=device, max_length=max_length).to(dtype)
        model.eval()
        return model, model.tokenizer, "cosine", model.config.dpa_rag

    def save(self, trainer: Any, model: nn.Module, tokenizer: Any, model_dir: Path, main: bool) -> None:
        if main:
            model.save(model_dir)

    def log_fields(self, model: nn.Module) -> dict[str, Any]:
        return {"scale": float(model.scale.detach()), "bias": float(model.bias.detach())}

    def collator(self, tokenizer: Any, losses: Sequence[Any], max_length: int, query_anchor: bool = False,
                 grouped: bool = False) -> BiEncoderCollator:
        return BiEncoderCollator(tokenizer, losses, max_length, query_anchor=query_anchor, grouped=grouped)

    def train_max_length(self, model: nn.Module, max_length: int) -> int:
        return model.st.max_seq_length or max_length

    def encode(self, model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None,
               separate: bool = False) -> Any:
        if not separate:
            return encode_bi(model, batch, chunk_size)
        if not batch.get("grouped", False):
            raise ValueError("separate passes need a batch collated with BiEncoderCollator(grouped=True)")
        return encode_bi_groups(model, batch, chunk_size)

    def freeze_unreached(self, model: nn.Module, losses: Sequence[Any]) -> list[str]:
        """A sentence-transformers forward never uses its encoder's pooler; without a loss that reads the logits,
        the scale and bias get no gradient either."""
        named = list(model.named_parameters())
        names = [n for n, _ in named if "pooler" in n.split(".")]
        if not any(loss.uses_logits for loss in losses):
            names += ["log_scale", "bias"]
        out = []
        for n, p in named:
            if n in names and p.requires_grad:
                p.requires_grad_(False)
                out.append(n)
        return out

    def predict_logits(self, model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
                       max_length: int) -> Tensor:
        return score_bi(model, [(str(q), str(d)) for q, d in pairs], batch_size, max_length)

    def score_pairs(self, model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
                    max_length: int, score: str) -> list[float]:
        """``cosine``: the plain cosine similarity (what ``Reranker`` ranks a bi-encoder by; the logit's order)."""
        if score == "cosine":
            return score_bi(model, [(str(q), str(d)) for q, d in pairs], batch_size, max_length, cosine=True).tolist()
        return super().score_pairs(model, tokenizer, pairs, batch_size, max_length, score)

    def card_fields(self, head: str) -> dict[str, str]:
        return {
            "pipeline_tag": "sentence-similarity",
            "tag": "bi-encoder",
            "description": "A bi-encoder (sentence-transformers embedding model; score = cosine of query and passage "
                           "embeddings) ",
            "head_line": "",
            "st_class": "SentenceTransformer",
            "loads_with": "`sentence_transformers.SentenceTransformer` (score: `model.similarity`), "
                          "`dpa_rag.reranker.Reranker`; not `CrossEncoder` (there is no classification head: "
                          "`CrossEncoder(path)` refuses this folder)",
            "loader": ('model = SentenceTransformer("path/to/model")\n'
                       'q, d = model.encode(["who wrote hamlet"]), model.encode(["Title: Hamlet Content: ..."])\n'
                       "model.similarity(q, d)  # the reranker's score (cosine)\n"),
        }
