"""Dense retrieval: a sentence-transformers bi-encoder plus a faiss inner-product index.

* :func:`load_encoder` accepts a bundled alias (``minilm``), a hub id, a sentence-transformers folder, or a *plain*
  Hugging Face encoder folder (wrapped as Transformer + mean pooling). ``pooling`` picks the sentence vector:
  ``auto`` (a sentence-transformers model's own; DPR's ``pooler_output``; mean for a plain HF folder), ``cls``,
  ``mean`` (e.g. contriever) or ``pooler`` (the model's own ``pooler_output``).
* DPR checkpoints (``model_type: dpr``) are read with transformers' ``DPRQuestionEncoder``/``DPRContextEncoder``
  (chosen by the checkpoint's ``architectures``), whose ``pooler_output`` is the last layer's CLS vector (plus the
  projection when ``projection_dim > 0``; none for the ``single-nq`` models). ``AutoModel`` would load a context
  encoder as a question encoder (wrong weight prefix), so sentence-transformers' ``Transformer`` is not used for them.
  A DPR context encoder reads a passage as DPR does: ``[CLS] title [SEP] text [SEP]`` (the text alone when there is
  no title), segment ids all 0.
* Queries and passages may use different encoders (DPR's question/context pair): ``query_encoder`` in ``meta.json``;
  without it the passage encoder encodes the queries too.
* The index folder holds ``index.faiss`` and ``meta.json`` (encoder(s), fingerprint(s), pooling, dimension,
  normalisation, count, dtype, prompts), so the query side always uses the encoder recorded there. Indexes written
  before ``pooling``/``query_encoder`` existed load as ``pooling: auto`` with one shared encoder.
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

__all__ = ["POOLINGS", "DenseRetriever", "HFEncoder", "encode", "load_encoder", "passage_inputs"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
POOLINGS = ("auto", "cls", "mean", "pooler")
_DPR_ENCODERS = {"query": "DPRQuestionEncoder", "passage": "DPRContextEncoder"}


def _hf_config(path: str) -> Any:
    """The checkpoint's transformers config, or ``None`` where there is none to read (e.g. not cached offline)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        return None


class HFEncoder:
    """A Hugging Face encoder run with transformers directly, with the encode interface ``dense`` uses.

    Used for DPR checkpoints (``DPRQuestionEncoder``/``DPRContextEncoder``) and for ``pooling="pooler"``.

    Args:
        path: hub id or local folder (model + tokenizer).
        pooling: ``pooler`` (the model's ``pooler_output``; DPR: last-layer CLS), ``cls`` (last-layer CLS token) or
            ``mean`` (masked mean of the last layer's token vectors).
        role: ``query`` or ``passage``: which DPR class to use when the config names none.
        device: torch device.
        dtype: torch dtype of the weights.
    """

    def __init__(self, path: str, pooling: str, role: str, device: str, dtype: Any) -> None:
        import inspect

        import transformers
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("pooler", "cls", "mean"):
            raise ValueError(f"HFEncoder pooling must be pooler, cls or mean, not '{pooling}'")
        config = transformers.AutoConfig.from_pretrained(path)
        model_cls: Any = AutoModel
        if config.model_type == "dpr":
            archs = list(config.architectures or [])
            named = [a for a in archs if a in _DPR_ENCODERS.values()]
            if archs and not named:
                raise ValueError(f"{path}: {', '.join(archs)} is not a DPR question or context encoder")
            model_cls = getattr(transformers, named[0] if named else _DPR_ENCODERS[role])
        self.model = model_cls.from_pretrained(path, dtype=dtype).to(device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pooling = pooling
        self.device = device
        self.is_dpr = config.model_type == "dpr"
        # DPR's context encoder was trained on (title, text) pairs: build_dense passes passages that way
        self.title_text_pairs = self.is_dpr and type(self.model).__name__ == "DPRContextEncoder"
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_seq_length: int = min(int(self.tokenizer.model_max_length), int(limit))
        self._forward_args = set(inspect.signature(self.model.forward).parameters)

    def get_embedding_dimension(self) -> int:
        """Size of the sentence vector."""
        cfg = self.model.config
        if self.pooling == "pooler" and self.is_dpr and getattr(cfg, "projection_dim", 0) > 0:
            return int(cfg.projection_dim)
        return int(cfg.hidden_size)

    def parameters(self) -> Any:
        return self.model.parameters()

    def eval(self) -> HFEncoder:
        self.model.eval()
        return self

    def _tokenize(self, texts: Sequence[str | tuple[str, str]]) -> Any:
        if not texts or isinstance(texts[0], str):
            return self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
            )
        # (title, text): DPR's tensorizer encodes title + text_pair, or the text alone when there is no title
        rows = [
            self.tokenizer(t, x, truncation=True, max_length=self.max_seq_length) if t
            else self.tokenizer(x, truncation=True, max_length=self.max_seq_length)
            for t, x in texts
        ]
        batch = self.tokenizer.pad(rows, return_tensors="pt")
        if "token_type_ids" in batch:
            batch["token_type_ids"].zero_()  # DPR encodes passages with all-zero segment ids
        return batch

    def embed(
        self, texts: Sequence[str | tuple[str, str]], batch_size: int = 64, normalize: bool = False
    ) -> np.ndarray:
        """Sentence vectors (fp32 rows) for ``texts`` (strings, or ``(title, text)`` pairs)."""
        import torch

        rows: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            batch = self._tokenize(texts[start : start + batch_size])
            inputs = {k: v.to(self.device) for k, v in batch.items() if k in self._forward_args}
            with torch.inference_mode():
                out = self.model(**inputs, output_hidden_states=self.pooling != "pooler", return_dict=True)
                if self.pooling == "pooler":
                    emb = getattr(out, "pooler_output", None)
                    if emb is None:
                        raise ValueError("this model has no pooler output; use pooling cls or mean")
                else:
                    tokens = getattr(out, "last_hidden_state", None)
                    if tokens is None:
                        tokens = out.hidden_states[-1]
                    if self.pooling == "cls":
                        emb = tokens[:, 0]
                    else:
                        mask = inputs["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                        emb = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                emb = emb.float()
                if normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=-1)
            rows.append(emb.cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.get_embedding_dimension()), dtype=np.float32)

    def _encode(self, sentences: Sequence[Any], batch_size: int = 64, normalize_embeddings: bool = False,
                prompt: str | None = None, **_: Any) -> np.ndarray:
        texts = list(sentences)
        if prompt:
            texts = [f"{prompt}{t}" if isinstance(t, str) else (f"{prompt}{t[0]}", t[1]) for t in texts]
        return self.embed(texts, batch_size, normalize_embeddings)

    def encode_query(self, sentences: Sequence[str], **kwargs: Any) -> np.ndarray:
        """As ``SentenceTransformer.encode_query`` (``batch_size``, ``normalize_embeddings``, ``prompt``)."""
        return self._encode(sentences, **kwargs)

    def encode_document(self, sentences: Sequence[str], **kwargs: Any) -> np.ndarray:
        """As ``SentenceTransformer.encode_document``."""
        return self._encode(sentences, **kwargs)


def load_encoder(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    max_seq_length: int | None = None,
    pooling: str = "auto",
    role: str = "passage",
) -> Any:
    """Load an encoder: a ``SentenceTransformer``, or an :class:`HFEncoder` for DPR checkpoints and ``pooler``.

    Args:
        name: ``minilm`` (bundled), a hub id, or a local folder. A local folder without ``modules.json`` is a plain
            HF encoder and gets mean pooling (under ``pooling="auto"``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        dtype: ``auto`` (see :func:`dpa_rag.models.pick_dtype`), ``float32``, ``bfloat16``, ``float16``.
        max_seq_length: truncate inputs to this many tokens (default: the model's own setting).
        pooling: ``auto`` (sentence-transformers model: its own modules; DPR: ``pooler_output``; plain HF folder:
            mean), ``cls``, ``mean`` (Transformer + Pooling built on the fly; a sentence-transformers model's own
            pooling and later modules are replaced) or ``pooler`` (the model's ``pooler_output``).
        role: ``query`` or ``passage``; picks the DPR class when a DPR config names no architecture.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling '{pooling}' (expected one of {', '.join(POOLINGS)})")
    path = resolve_encoder(name)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    model_kwargs = {"dtype": torch_dtype}
    folder = Path(path)
    plain_folder = folder.is_dir() and not (folder / "modules.json").exists()
    if plain_folder and not (folder / "config.json").exists():
        raise ValueError(f"{folder}: not a model folder (no modules.json or config.json)")
    sentence_transformers_folder = folder.is_dir() and not plain_folder
    config = None if pooling == "auto" and sentence_transformers_folder else _hf_config(path)
    is_dpr = getattr(config, "model_type", None) == "dpr"
    model: Any
    if is_dpr or pooling == "pooler":
        model = HFEncoder(path, "pooler" if pooling == "auto" else pooling, role, device, torch_dtype)
    elif pooling in ("cls", "mean") or plain_folder:
        transformer = Transformer(path, model_kwargs=model_kwargs)
        pool = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean" if pooling == "auto" else pooling)
        model = SentenceTransformer(modules=[transformer, pool], device=device)
    else:
        model = SentenceTransformer(path, device=device, model_kwargs=model_kwargs)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


def encode(
    model: Any,
    texts: Sequence[Any],
    batch_size: int = 64,
    normalize: bool = True,
    prompt: str | None = None,
    is_query: bool = False,
) -> np.ndarray:
    """Encode texts to a C-contiguous fp32 matrix (one row per text).

    ``prompt`` is prepended to every text (e.g. ``"query: "`` for E5); without it, a model's own configured query or
    document prompt applies (``encode_query``/``encode_document``). ``texts`` may be ``(title, text)`` pairs for an
    :class:`HFEncoder` whose ``title_text_pairs`` is set (see :func:`passage_inputs`).
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


def passage_inputs(model: Any, passages: Sequence[Passage]) -> list[Any]:
    """What ``model`` reads for each passage: ``(title, text)`` for a DPR context encoder, else ``title\ntext``."""
    if getattr(model, "title_text_pairs", False):
        return [(p.title.strip(), p.text.strip()) for p in passages]
    return [doc_text(p) for p in passages]


def _check_dim(model: Any, dim: int | None, name: str) -> None:
    got = int(model.get_embedding_dimension())
    if dim is not None and got != int(dim):
        raise ValueError(
            f"query encoder {name} gives {got}-dimensional vectors, but the passages are {dim}-dimensional"
        )


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
        meta: the index's ``meta.json`` (encoder, query_encoder, pooling, normalize, prompts, …).
        encoder: a loaded query encoder; loaded lazily from ``meta`` when ``None`` (``query_encoder`` if recorded,
            else ``encoder``, with the recorded ``pooling``).
        query_encoder: name of a query encoder to use instead of the one ``meta`` records (lazy load only).
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
        query_encoder: str | None = None,
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
        self.query_encoder = query_encoder

    @property
    def query_encoder_name(self) -> str:
        """The query encoder's name: the override, else ``meta``'s ``query_encoder``, else the passage encoder."""
        return self.query_encoder or self.meta.get("query_encoder") or self.meta["encoder"]

    @property
    def encoder(self) -> Any:
        """The query encoder (loaded on first use)."""
        if self._encoder is None:
            dtype = self.meta.get("dtype", "float32") if self.dtype == "auto" else self.dtype
            name = self.query_encoder_name
            model = load_encoder(
                name, self.device, dtype, max_seq_length=self.meta.get("max_seq_length"),
                pooling=self.meta.get("pooling") or "auto", role="query",
            )
            _check_dim(model, self.meta.get("dim"), name)
            if not self.query_encoder:  # an override has no recorded fingerprint to compare with
                key = "query_fingerprint" if self.meta.get("query_encoder") else "fingerprint"
                current = fingerprint(resolve_encoder(name))
                if self.meta.get(key) and current != self.meta[key]:
                    logger.warning(
                        "encoder %s changed since the index was built (%s → %s); scores may be off",
                        name, self.meta[key], current,
                    )
            self._encoder = model
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
        query_encoder: str | None = None,
        pooling: str = "auto",
    ) -> DenseRetriever:
        """Encode ``passages`` in chunks (bounded memory) and add them to a new faiss index.

        ``query_encoder`` (default: ``encoder``) is recorded in ``meta.json`` and loaded here, before any passage is
        encoded, so that a missing model or a dimension mismatch fails at once. ``pooling`` applies to both.
        """
        from tqdm.auto import tqdm

        if query_encoder == encoder:
            query_encoder = None
        model = load_encoder(encoder, device, dtype, max_seq_length, pooling=pooling, role="passage")
        dim = int(model.get_embedding_dimension())
        query_model = model
        if query_encoder:
            query_model = load_encoder(query_encoder, device, dtype, max_seq_length, pooling=pooling, role="query")
            _check_dim(query_model, dim, query_encoder)
        index = _new_faiss_index(dim, index_type, hnsw_m, ef_construction)
        texts = passage_inputs(model, passages)
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
            "pooling": pooling,
            "passage_input": "title [SEP] text" if getattr(model, "title_text_pairs", False) else "title\ntext",
            "query_encoder": query_encoder,
            "query_encoder_path": resolve_encoder(query_encoder) if query_encoder else None,
            "query_fingerprint": fingerprint(resolve_encoder(query_encoder)) if query_encoder else None,
        }
        if index_type == "hnsw":
            meta.update(hnsw_m=hnsw_m, ef_construction=ef_construction)
        logger.info(
            "dense index: %d passages, dim %d, %s, encoder %s%s, pooling %s", index.ntotal, dim, index_type, encoder,
            f" (queries: {query_encoder})" if query_encoder else "", pooling,
        )
        return cls(index, passages, meta, encoder=query_model, device=device, batch_size=batch_size)

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
