"""Shared serve fixtures: a tiny 1-logit reranker, a BM25 index of the bundled sample, the base server options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpa_rag.reranker.model import load_reranker_model
from dpa_rag.retrieval.index import IndexConfig, build_index
from dpa_rag.sample import sample_path


@pytest.fixture(scope="session")
def reranker_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("reranker")
    torch.manual_seed(0)
    model, tok = load_reranker_model(str(tiny_bert_dir), "single")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index")
    build_index(IndexConfig(corpus=[sample_path("corpus.jsonl")], out_dir=out, kind="bm25", progress=False))
    return out


@pytest.fixture(scope="session")
def base_cfg(index_dir: Path, reranker_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"index": index_dir, "reranker": str(reranker_dir), "backend": "fake", "use_cache": False,
            "cache_dir": tmp_path_factory.mktemp("cache"), "batch_window_ms": 2.0, "dtype": "float32",
            "reranker_max_length": 128}
