"""Dense retrieval: a sentence-transformers bi-encoder plus a faiss inner-product index.

* :func:`load_encoder` accepts a bundled alias (``minilm``), a hub id, a sentence-transformers folder, or a *plain*
  Hugging Face encoder folder (wrapped as Transformer + mean pooling).
* The index folder holds ``index.faiss`` and ``meta.json`` (encoder name and fingerprint, dimension, normalisation,
  count, dtype, prompts), so the query side always uses the encoder the passages were encoded with.
* Embeddings are fp32 for faiss; with ``normalize`` the inner product is the cosine similarity. ``flat`` is exact
  search; ``hnsw`` is approximate (``IndexHNSWFlat``, inner-product metric).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpa_rag.data.schema import Passage
from dpa_rag.io import respect_umask, write_json
from dpa_rag.models import fingerprint, pick_device, pick_dtype, resolve_encoder
from dpa_rag.retrieval.base import Hit, doc_text, sort_hits

__all__ = ["DenseRetriever", "encode", "load_encoder"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"


def load_encoder(name: str, device: str = "auto", dtype: str = "auto", max_seq_length: int | None = None) -> Any:
    """Load a ``SentenceTransformer`` from an alias, hub id, sentence-transformers folder or plain HF folder.

    Args:
        name: ``minilm`` (bundled), a hub id, or a local folder. A local folder without ``modules.json`` is a plain
            HF encoder and gets mean pooling.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        dtype: ``auto`` (see :func:`dpa_rag.models.pick_dtype`), ``float32``, ``bfloat16``, ``float16``.
        max_seq_length: truncate inputs to this many tokens (default: the model's own setting).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    path = resolve_encoder(name)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    model_kwargs = {"dtype": torch_dtype}
    folder = Path(path)
    if folder.is_dir() and not (folder / "modules.json").exists():
        if not (folder / "config.json").exists():
            raise ValueError(f"{folder}: not a model folder (no modules.json or config.json)")
        transformer = Transformer(str(folder), model_kwargs=model_kwargs)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        model = SentenceTransformer(modules=[transformer, pooling], device=device)
    else:
        model = SentenceTransformer(path, device=device, model_kwargs=model_kwargs)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


def encode(
    model: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    normalize: bool = True,
    prompt: str | None = None,
    is_query: bool = False,
) -> np.ndarray:
    """Encode texts to a C-contiguous fp32 matrix (one row per text).

    ``prompt`` is prepended to every text (e.g. ``"query: "`` for E5); without it, a model's own configured query or
    document prompt applies (``encode_query``/``encode_document``).
    """
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    fn = model.encode_query if is_query else model.encode_document
    kwargs: dict[str, Any] = {"prompt": prompt} if prompt else {}
    emb = fn(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=False,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
        **kwargs,
    )
    return np.ascontiguousarray(np.asarray(emb, dtype=np.float32))


def _new_faiss_index(dim: int, index_type: str, hnsw_m: int, ef_construction: int) -> Any:
    import faiss

    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        return index
    raise ValueError(f"unknown faiss index type '{index_type}' (expected flat or hnsw)")


class DenseRetriever:
    """Inner-product search over passage embeddings.

    Args:
        index: a faiss index with one vector per passage, in passage order.
        passages: the passages.
        meta: the index's ``meta.json`` (encoder, normalize, prompts, …).
        encoder: a loaded ``SentenceTransformer``; loaded lazily from ``meta`` when ``None``.
        device: device for the lazily loaded encoder.
        dtype: dtype for the lazily loaded encoder (``auto`` = the dtype the passages were encoded with).
        batch_size: query encoding batch size.
        ef_search: HNSW search depth (raised to ``top_k`` when smaller).
    """

    def __init__(
        self,
        index: Any,
        passages: list[Passage],
        meta: dict[str, Any],
        encoder: Any = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        ef_search: int = 128,
    ) -> None:
        if int(index.ntotal) != len(passages):
            raise ValueError(f"dense index has {index.ntotal} vectors but there are {len(passages)} passages")
        self.index = index
        self.passages = passages
        self.meta = meta
        self._encoder = encoder
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.ef_search = ef_search

    @property
    def encoder(self) -> Any:
        """The query encoder (loaded on first use)."""
        if self._encoder is None:
            dtype = self.meta.get("dtype", "float32") if self.dtype == "auto" else self.dtype
            self._encoder = load_encoder(
                self.meta["encoder"], self.device, dtype, max_seq_length=self.meta.get("max_seq_length")
            )
            current = fingerprint(resolve_encoder(self.meta["encoder"]))
            if self.meta.get("fingerprint") and current != self.meta["fingerprint"]:
                logger.warning(
                    "encoder %s changed since the index was built (%s → %s); scores may be off",
                    self.meta["encoder"], self.meta["fingerprint"], current,
                )
        return self._encoder

    @classmethod
    def build(
        cls,
        passages: list[Passage],
        encoder: str = "minilm",
        batch_size: int = 64,
        device: str = "auto",
        dtype: str = "auto",
        normalize: bool = True,
        index_type: str = "flat",
        hnsw_m: int = 32,
        ef_construction: int = 200,
        max_seq_length: int | None = None,
        query_prompt: str | None = None,
        passage_prompt: str | None = None,
        chunk_size: int = 8192,
        show_progress: bool = True,
    ) -> DenseRetriever:
        """Encode ``passages`` in chunks (bounded memory) and add them to a new faiss index."""
        from tqdm.auto import tqdm

        model = load_encoder(encoder, device, dtype, max_seq_length)
        dim = int(model.get_embedding_dimension())
        index = _new_faiss_index(dim, index_type, hnsw_m, ef_construction)
        texts = [doc_text(p) for p in passages]
        with tqdm(total=len(texts), desc="encode passages", unit="psg", disable=not show_progress) as bar:
            for start in range(0, len(texts), chunk_size):
                chunk = texts[start : start + chunk_size]
                index.add(encode(model, chunk, batch_size, normalize, passage_prompt, is_query=False))
                bar.update(len(chunk))
        first = next(model.parameters(), None)
        meta = {
            "encoder": encoder,
            "encoder_path": resolve_encoder(encoder),
            "fingerprint": fingerprint(resolve_encoder(encoder)),
            "dim": dim,
            "normalize": normalize,
            "count": int(index.ntotal),
            "index_type": index_type,
            "metric": "inner_product",
            "dtype": str(first.dtype).replace("torch.", "") if first is not None else "float32",
            "max_seq_length": max_seq_length,
            "query_prompt": query_prompt,
            "passage_prompt": passage_prompt,
        }
        if index_type == "hnsw":
            meta.update(hnsw_m=hnsw_m, ef_construction=ef_construction)
        logger.info("dense index: %d passages, dim %d, %s, encoder %s", index.ntotal, dim, index_type, encoder)
        return cls(index, passages, meta, encoder=model, device=device, batch_size=batch_size)

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` (atomically) and ``meta.json`` to ``directory``."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_FILE}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            respect_umask(tmp)  # mkstemp makes it 0600 (faiss keeps the mode): give it the mode open would
            faiss.write_index(self.index, tmp)
            os.replace(tmp, directory / INDEX_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json(directory / META_FILE, self.meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, passages: list[Passage], mmap: bool = False, **kwargs: Any) -> DenseRetriever:
        """Load an index written by :meth:`save`; ``kwargs`` go to the constructor (device, dtype, batch_size, …)."""
        import faiss

        directory = Path(directory)
        if not (directory / INDEX_FILE).exists():
            raise FileNotFoundError(f"{directory}: no dense index here ({INDEX_FILE} missing)")
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(directory / INDEX_FILE), flags)
        return cls(index, passages, meta, **kwargs)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Query embeddings as the index expects them (same normalisation and prompt)."""
        return encode(
            self.encoder, queries, self.batch_size, bool(self.meta.get("normalize", True)),
            self.meta.get("query_prompt"), is_query=True,
        )

    def search_vectors(self, vectors: np.ndarray, top_k: int) -> list[list[Hit]]:
        """Search with precomputed query vectors (rows); results best first, ties by passage index."""
        k = min(int(top_k), int(self.index.ntotal))
        if k <= 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(self.ef_search, k)
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [
            sort_hits([(i, s) for i, s in zip(row_i, row_s, strict=True) if i >= 0])
            for row_i, row_s in zip(ids, scores, strict=True)
        ]

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Encode ``queries`` and return the ``top_k`` passages each (clamped to the index size)."""
        return self.search_vectors(self.encode_queries(queries), top_k)
