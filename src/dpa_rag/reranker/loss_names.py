"""The reranker's loss names (no torch: :mod:`dpa_rag.reranker.config` validates with them, ``--help`` stays cheap).

Re-exported as :data:`dpa_rag.reranker.losses.LOSS_NAMES`, next to the loss modules.
"""

from __future__ import annotations

__all__ = ["LOSS_NAMES"]

# Loss names as used on the command line, in the authors' order (cls, rank, scl).
LOSS_NAMES: tuple[str, ...] = ("point", "pair", "contrastive")
