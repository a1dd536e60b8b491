"""Diverse query augmentation (``dpa-rag augment``) and consistency filtering (``dpa-rag filter``), method.md §4-§5.

Heavy modules (transformers, sentence-transformers) are imported only when a scorer is built.
"""

from __future__ import annotations

from dpa_rag.augment.augment import AugmentConfig, augment_questions, augmented_to_questions, rewrite_id
from dpa_rag.augment.augment import run as run_augment
from dpa_rag.augment.filter import FilterConfig, filter_records, load_augmentation_records
from dpa_rag.augment.filter import run as run_filter
from dpa_rag.augment.inherit import group_split, inherit_preferences, inherit_retrieval
from dpa_rag.augment.parser import ParsedRewrite, parse_rewrite
from dpa_rag.augment.strategies import DEFAULT_STRATEGIES, load_templates

__all__ = [
    "DEFAULT_STRATEGIES",
    "AugmentConfig",
    "FilterConfig",
    "ParsedRewrite",
    "augment_questions",
    "augmented_to_questions",
    "filter_records",
    "group_split",
    "inherit_preferences",
    "inherit_retrieval",
    "load_augmentation_records",
    "load_templates",
    "parse_rewrite",
    "rewrite_id",
    "run_augment",
    "run_filter",
]
