"""dpa-rag: Dual Preference Alignment for Retrieval-Augmented Generation."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
