"""Embedding-similarity consistency scoring: cosine of sentence embeddings of the original and the rewrite.

The offline default filter (the bundled ``minilm`` encoder). It catches rewrites that drifted off topic or are
garbage; it cannot see a flipped meaning ("first" vs "last"), which the NLI backend is for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dpa_rag.models import pick_device, resolve_encoder

__all__ = ["DEFAULT_SIMILARITY_THRESHOLD", "SimilarityScorer"]

logger = logging.getLogger(__name__)

# all-MiniLM-L6-v2 on NQ questions (docs/augment.md): random question pairs mean 0.01, 99th percentile 0.27; hand-made
# rephrasing/complexity/decomposition/constraint rewrites 0.57-0.89.
DEFAULT_SIMILARITY_THRESHOLD = 0.5


class SimilarityScorer:
    """A sentence-transformers encoder, loaded once.

    Args:
        encoder: bundled alias (``minilm``), hub id or local folder (a plain HF encoder gets mean pooling).
        device: ``auto``, ``cpu``, ``cuda``…
        batch_size: texts per encoder batch.
    """

    def __init__(self, encoder: str = "minilm", device: str = "auto", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self.device = pick_device(device)
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_encoder(encoder), device=self.device)
        logger.info("similarity encoder %s on %s", encoder, self.device)

    def score(self, originals: Sequence[str], rewrites: Sequence[str], progress: bool = False) -> list[float]:
        """Cosine similarity of each (original, rewrite) pair, in order (each distinct text is encoded once)."""
        if len(originals) != len(rewrites):
            raise ValueError(f"{len(originals)} originals but {len(rewrites)} rewrites")
        if not originals:
            return []
        texts = list(dict.fromkeys([*originals, *rewrites]))
        index = {t: i for i, t in enumerate(texts)}
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        sims = [float(emb[index[a]] @ emb[index[b]]) for a, b in zip(originals, rewrites, strict=True)]
        return [round(min(1.0, max(-1.0, s)), 6) for s in sims]
