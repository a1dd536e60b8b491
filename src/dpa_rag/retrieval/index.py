"""The ``index`` stage: one folder that holds a corpus and its BM25 and/or dense indexes.

Layout of an index folder::

    passages.jsonl      the corpus in our format ({id, title, text}); passage_idx = line number - 1
    index.json          which parts exist, passage count, corpus files
    bm25/               bm25s files + tokenizer.json
    dense/index.faiss   faiss inner-product index
    dense/meta.json     encoder(s) + fingerprint(s), pooling, dim, normalize, count, dtype, prompts
    config.yaml, manifest.json

Because the folder carries its own passages, an index can't be paired with the wrong corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from dpa_rag.config import Runtime, StageConfig
from dpa_rag.data.loaders import load_corpus
from dpa_rag.data.schema import Passage
from dpa_rag.io import DataError, iter_jsonl, write_json, write_jsonl
from dpa_rag.models import DEFAULT_ENCODER
from dpa_rag.retrieval.base import Retriever
from dpa_rag.retrieval.bm25 import BM25Retriever
from dpa_rag.retrieval.dense import DenseRetriever
from dpa_rag.retrieval.hybrid import HybridRetriever
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "INDEX_INFO",
    "PASSAGES",
    "Index",
    "Config",
    "IndexConfig",
    "IndexOutputs",
    "Outputs",
    "build_index",
    "load_index",
    "load_retriever",
    "run",
]

logger = logging.getLogger(__name__)

PASSAGES = "passages.jsonl"
INDEX_INFO = "index.json"
Method = Literal["bm25", "dense", "hybrid"]


class IndexConfig(Runtime, StageConfig):
    """Configuration of ``dpa-rag index``."""

    corpus: list[Path] = Field(
        description="Corpus file(s): ours {id,title,text}, FlashRAG {contents}, DPR psgs_w100.tsv, or a retrieval "
        "file's ctxs (.jsonl/.json, .gz allowed)."
    )
    out_dir: Path = Field(Path("runs/index"), description="Index folder to write.")
    kind: Literal["bm25", "dense", "both"] = Field("both", description="Which indexes to build.")
    dedup: bool = Field(True, description="Drop passages whose (title, text) repeats an earlier one.")
    encoder: str = Field(DEFAULT_ENCODER, description="Dense encoder: bundled alias, hub id, or local folder.")
    query_encoder: str | None = Field(
        None,
        description="Separate dense query encoder (e.g. DPR's question encoder, with --encoder its context encoder); "
        "recorded in dense/meta.json so `retrieve` uses it. Default: the passage encoder.",
    )
    pooling: Literal["auto", "cls", "mean", "pooler"] = Field(
        "auto",
        description="Sentence vector: auto (a sentence-transformers model's own; DPR: pooler output; plain HF "
        "folder: mean), cls, mean (e.g. facebook/contriever) or pooler (the model's pooler_output).",
    )
    batch_size: int = Field(64, ge=1, description="Passages per encoding batch (the encoder's device and dtype: "
                            "--device, --dtype; faiss gets fp32).")
    normalize: bool = Field(True, description="L2-normalise embeddings (inner product = cosine).")
    max_seq_length: int | None = Field(None, ge=8, description="Truncate passages to this many tokens.")
    query_prompt: str | None = Field(None, description="Prefix for queries (e.g. 'query: ' for E5).")
    passage_prompt: str | None = Field(None, description="Prefix for passages (e.g. 'passage: ' for E5).")
    faiss_index: Literal["flat", "hnsw"] = Field("flat", description="flat = exact inner product; hnsw = approximate.")
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree.")
    hnsw_ef_construction: int = Field(200, ge=8, description="HNSW build-time search depth.")
    bm25_k1: float = Field(1.5, ge=0, description="BM25 k1.")
    bm25_b: float = Field(0.75, ge=0, le=1, description="BM25 b.")
    bm25_method: Literal["robertson", "lucene", "atire", "bm25l", "bm25+"] = Field(
        "lucene", description="BM25 variant (bm25s)."
    )
    stopwords: str | None = Field("en", description="BM25 stop-word list (bm25s name, e.g. en) or none.")
    stemmer: str | None = Field(None, description="BM25 stemmer language (needs PyStemmer), e.g. english.")
    progress: bool = Field(True, description="Show progress bars.")


@dataclasses.dataclass(frozen=True)
class IndexOutputs(StageOutputs):
    """What ``index`` writes: the folder is the index (``load_index``); its passages and parts list."""

    FILES: ClassVar[dict[str, str]] = {"passages": PASSAGES, "info": INDEX_INFO}
    OPEN: ClassVar[bool] = True  # also the bm25/ and dense/ parts
    passages: Path
    info: Path


Config = IndexConfig
Outputs = IndexOutputs


def build_index(cfg: IndexConfig, passages: list[Passage] | None = None) -> dict[str, Any]:
    """Load the corpus (unless ``passages`` is given) and write the index folder; returns the ``index.json`` info."""
    out = Path(cfg.out_dir)
    if passages is None:
        passages = load_corpus(cfg.corpus, dedup=cfg.dedup)
    kinds = ["bm25", "dense"] if cfg.kind == "both" else [cfg.kind]
    # Build every part in memory first (the encoder loads here), so a failure leaves the folder untouched.
    bm25 = dense = None
    if "bm25" in kinds:
        bm25 = BM25Retriever.build(
            passages, k1=cfg.bm25_k1, b=cfg.bm25_b, method=cfg.bm25_method, stopwords=cfg.stopwords,
            stemmer=cfg.stemmer, show_progress=cfg.progress,
        )
    if "dense" in kinds:
        dense = DenseRetriever.build(
            passages, encoder=cfg.encoder, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
            normalize=cfg.normalize, index_type=cfg.faiss_index, hnsw_m=cfg.hnsw_m,
            ef_construction=cfg.hnsw_ef_construction, max_seq_length=cfg.max_seq_length,
            query_prompt=cfg.query_prompt, passage_prompt=cfg.passage_prompt, show_progress=cfg.progress,
            query_encoder=cfg.query_encoder, pooling=cfg.pooling,
        )
    out.mkdir(parents=True, exist_ok=True)
    # Parts of an older index in the same folder would no longer match the passages: remove them first.
    (out / INDEX_INFO).unlink(missing_ok=True)
    for part in ("bm25", "dense"):
        if (out / part).exists():
            shutil.rmtree(out / part)
    write_jsonl(out / PASSAGES, passages)
    if bm25 is not None:
        bm25.save(out / "bm25")
    if dense is not None:
        dense.save(out / "dense")
    info = {"kinds": kinds, "count": len(passages), "corpus": [str(p) for p in cfg.corpus]}
    write_json(out / INDEX_INFO, info)
    return info


def run(cfg: IndexConfig) -> IndexOutputs:
    """Stage entry point: build the index folder, record config and manifest."""
    rec = stage_recorder("index", cfg, cfg.out_dir, cfg.corpus)
    with rec.timer("load_corpus"):
        passages = load_corpus(cfg.corpus, dedup=cfg.dedup)
    with rec.timer("build"):
        info = build_index(cfg, passages)
    outputs = [PASSAGES, INDEX_INFO]
    if "bm25" in info["kinds"]:
        outputs.append("bm25/params.index.json")
    if "dense" in info["kinds"]:
        outputs += ["dense/index.faiss", "dense/meta.json"]
    rec.finish(outputs=outputs, passages=len(passages), kinds=info["kinds"])
    logger.info("index: %d passages (%s) in %s", len(passages), ", ".join(info["kinds"]), cfg.out_dir)
    return IndexOutputs.at(cfg.out_dir)


class Index:
    """An index folder on disk; the parts load lazily and are cached.

    Args:
        directory: a folder written by :func:`build_index`.

    Attributes:
        passages: the corpus, in index order.
        kinds: the parts present (``bm25``, ``dense``).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        info_path = self.directory / INDEX_INFO
        if not info_path.exists():
            raise FileNotFoundError(
                f"{self.directory}: not an index folder ({INDEX_INFO} missing; build it with `dpa-rag index`)"
            )
        self.info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
        self.kinds: list[str] = list(self.info.get("kinds", []))
        self.passages = [Passage.model_validate(rec) for _, rec in iter_jsonl(self.directory / PASSAGES)]
        if len(self.passages) != self.info.get("count"):
            raise DataError(
                f"{self.directory / PASSAGES}: {len(self.passages)} passages, "
                f"but {INDEX_INFO} says {self.info.get('count')}"
            )
        self._bm25: BM25Retriever | None = None
        self._dense: DenseRetriever | None = None

    def _require(self, kind: str) -> None:
        if kind not in self.kinds:
            raise ValueError(
                f"{self.directory} has no {kind} index (it has: {', '.join(self.kinds) or 'none'}); "
                f"rebuild with `dpa-rag index --kind {kind}` or `--kind both`"
            )

    def bm25(self, mmap: bool = False) -> BM25Retriever:
        """The BM25 part."""
        self._require("bm25")
        if self._bm25 is None:
            self._bm25 = BM25Retriever.load(self.directory / "bm25", self.passages, mmap=mmap)
        return self._bm25

    def dense(self, **kwargs: Any) -> DenseRetriever:
        """The dense part; ``kwargs`` (device, dtype, batch_size, ef_search, encoder, query_encoder) apply on first
        load."""
        self._require("dense")
        if self._dense is None:
            self._dense = DenseRetriever.load(self.directory / "dense", self.passages, **kwargs)
        return self._dense

    def retriever(
        self,
        method: Method = "bm25",
        rrf_k: int = 60,
        fusion_depth: int = 100,
        **dense_kwargs: Any,
    ) -> Retriever:
        """A retriever over this index: ``bm25``, ``dense`` or ``hybrid`` (RRF of both)."""
        if method == "bm25":
            return self.bm25()
        if method == "dense":
            return self.dense(**dense_kwargs)
        if method == "hybrid":
            return HybridRetriever([self.bm25(), self.dense(**dense_kwargs)], rrf_k=rrf_k, fusion_depth=fusion_depth)
        raise ValueError(f"unknown retrieval method '{method}' (expected bm25, dense or hybrid)")


def load_index(directory: str | Path) -> Index:
    """Open an index folder (passages now, BM25/dense parts on first use)."""
    return Index(directory)


def load_retriever(
    index_dir: str | Path,
    method: Method = "bm25",
    rrf_k: int = 60,
    fusion_depth: int = 100,
    **dense_kwargs: Any,
) -> Retriever:
    """Load a retriever from an index folder without rebuilding anything.

    Args:
        index_dir: a folder written by ``dpa-rag index``.
        method: ``bm25``, ``dense`` or ``hybrid``.
        rrf_k: RRF constant (hybrid).
        fusion_depth: candidates per side (hybrid).
        **dense_kwargs: ``device``, ``dtype``, ``batch_size``, ``ef_search``, ``encoder`` (a loaded model),
            ``query_encoder`` (a name that replaces the recorded query encoder).

    Returns:
        An object with ``passages`` and ``search(queries, top_k) -> list[list[(passage_idx, score)]]``.
    """
    return load_index(index_dir).retriever(method, rrf_k=rrf_k, fusion_depth=fusion_depth, **dense_kwargs)
