"""Sparse retrieval with `bm25s <https://github.com/xhluca/bm25s>`_ (pure Python + numpy, no Java).

The index folder holds bm25s's own files (``bm25s.BM25.save``) plus ``tokenizer.json`` with the tokenisation settings,
so queries are tokenised exactly like the corpus was. Scores are computed with bm25s, the top-k selection is ours
(:func:`~dpa_rag.retrieval.base.top_k_desc`): deterministic on ties and clamped to the corpus size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpa_rag.data.schema import Passage
from dpa_rag.io import respect_umask_tree, write_json
from dpa_rag.retrieval.base import Hit, doc_text, top_k_desc

__all__ = ["BM25Retriever", "make_stemmer"]

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def make_stemmer(language: str | None) -> Any:
    """A PyStemmer stemmer for ``language`` (e.g. ``"english"``), or ``None`` when ``language`` is empty/``"none"``.

    Raises:
        ValueError: PyStemmer is not installed, or the language is unknown to it.
    """
    if not language or language.lower() == "none":
        return None
    try:
        import Stemmer  # PyStemmer
    except ImportError:
        raise ValueError(f"BM25 stemming ('{language}') needs PyStemmer: pip install PyStemmer") from None
    try:
        return Stemmer.Stemmer(language)
    except KeyError:
        raise ValueError(f"PyStemmer has no stemmer for '{language}'") from None


def _bm25s() -> Any:
    """Import bm25s, undoing its import-time ``setLevel(DEBUG)`` so its logger follows ours again."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


def _stopwords_arg(stopwords: str | None) -> Any:
    return None if not stopwords or stopwords.lower() == "none" else stopwords


class BM25Retriever:
    """BM25 over an index's passages.

    Args:
        model: a built or loaded ``bm25s.BM25``.
        passages: the passages, in index order.
        stopwords: bm25s stop-word list name (``"en"``) or ``None``.
        stemmer: PyStemmer language or ``None``.

    Example:
        >>> r = BM25Retriever.build(passages)  # doctest: +SKIP
        >>> r.search(["who wrote hamlet"], top_k=5)  # doctest: +SKIP
        [[(12, 7.31), (3, 2.05), ...]]
    """

    def __init__(self, model: Any, passages: list[Passage], stopwords: str | None = "en", stemmer: str | None = None):
        self.model = model
        self.passages = passages
        self.stopwords = _stopwords_arg(stopwords)
        self.stemmer_name = stemmer
        self._stemmer = make_stemmer(stemmer)
        n = int(model.scores["num_docs"])
        if n != len(passages):
            raise ValueError(f"BM25 index has {n} documents but there are {len(passages)} passages")

    @classmethod
    def build(
        cls,
        passages: list[Passage],
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | None = "en",
        stemmer: str | None = None,
        show_progress: bool = True,
    ) -> BM25Retriever:
        """Tokenise and index ``passages`` (title + text)."""
        bm25s = _bm25s()
        stem = make_stemmer(stemmer)
        tokens = bm25s.tokenize(
            [doc_text(p) for p in passages],
            stopwords=_stopwords_arg(stopwords),
            stemmer=stem,
            return_ids=True,
            show_progress=show_progress,
        )
        model = bm25s.BM25(k1=k1, b=b, method=method)
        model.index(tokens, show_progress=show_progress)
        logger.info("BM25 index: %d passages, %d terms", len(passages), len(model.vocab_dict))
        return cls(model, passages, stopwords=stopwords, stemmer=stemmer)

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` (replaced as a whole, via a temporary folder)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.model.save(str(tmp), show_progress=False)
            write_json(tmp / TOKENIZER_FILE, {"stopwords": self.stopwords, "stemmer": self.stemmer_name})
            respect_umask_tree(tmp)  # mkdtemp made it 0700: give it (and any private file) the umask's modes
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path, passages: list[Passage], mmap: bool = False) -> BM25Retriever:
        """Load an index written by :meth:`save`; ``mmap`` keeps the score matrix on disk."""
        bm25s = _bm25s()
        directory = Path(directory)
        if not (directory / "params.index.json").exists():
            raise FileNotFoundError(f"{directory}: no BM25 index here (params.index.json missing)")
        settings = json.loads((directory / TOKENIZER_FILE).read_text(encoding="utf-8"))
        model = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
        return cls(model, passages, stopwords=settings.get("stopwords"), stemmer=settings.get("stemmer"))

    def tokenize(self, queries: Sequence[str]) -> list[list[str]]:
        """Tokenise queries like the corpus (lower-case, stop words, stemming)."""
        bm25s = _bm25s()
        out = bm25s.tokenize(
            list(queries), stopwords=self.stopwords, stemmer=self._stemmer, return_ids=False, show_progress=False
        )
        return [list(t) for t in out]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for one query (zeros when no query term is in the vocabulary)."""
        return self._scores_of_tokens(self.tokenize([query])[0])

    def _scores_of_tokens(self, tokens: list[str]) -> np.ndarray:
        empty = self.model.vocab_dict.get("")
        ids = [i for i in self.model.get_tokens_ids(tokens) if i != empty]
        if not ids:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(self.model.get_scores_from_ids(ids))

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Top ``top_k`` passages per query (clamped to the corpus size), best first, ties by passage index."""
        return [top_k_desc(self._scores_of_tokens(toks), top_k) for toks in self.tokenize(queries)]
