"""``dpa-rag train-reranker`` and ``dpa-rag rerank``."""

from __future__ import annotations

import typer

from dpa_rag.cli.builder import add_stage_command
from dpa_rag.reranker.config import RerankConfig, TrainRerankerConfig

__all__ = ["register"]

PANEL = "Reranker"


def _train(cfg: TrainRerankerConfig):
    from dpa_rag.reranker.train import run

    return run(cfg)  # run() resolves the authors' GPU flag itself, so the pipeline's in-process step does too


def _rerank(cfg: RerankConfig):
    from dpa_rag.reranker.rerank import run

    return run(cfg)


def register(app: typer.Typer) -> None:
    """Add the reranker commands to ``app``."""
    add_stage_command(
        app,
        "train-reranker",
        TrainRerankerConfig,
        _train,
        help=(
            "Align a reranker with the reader's preferences: point-wise, pair-wise and contrastive losses, MGDA "
            "weighting (method.md §6). Two kinds (--kind): cross-encoder (the paper's; model/ loads with "
            "sentence_transformers.CrossEncoder or AutoModelForSequenceClassification) and bi-encoder (scaled cosine "
            "of query and passage embeddings; model/ loads with sentence_transformers.SentenceTransformer, scored "
            "by its similarity(), not with CrossEncoder); both load with dpa_rag.reranker.Reranker. Default backbone: "
            "the bundled MiniLM (minilm, an embedding model), so --kind auto trains a bi-encoder; a cross-encoder "
            "backbone such as --backbone BAAI/bge-reranker-large (bge-reranker, ms-marco cross-encoders, plain "
            "encoders) gives the paper's cross-encoder. Reads the authors' files; accepts their flags "
            "(--pretrained_model_path, --train_data_path, --gpu=0, --outdir, --cls_loss, ...); their command "
            "without --pretrained_model_path uses BAAI/bge-reranker-large when it is in the Hugging Face cache."
        ),
        rich_help_panel=PANEL,
    )
    add_stage_command(
        app,
        "rerank",
        RerankConfig,
        _rerank,
        help="Rescore a retrieval file (top-100) with a reranker and keep the top-k (same DPR format).",
        rich_help_panel=PANEL,
    )
