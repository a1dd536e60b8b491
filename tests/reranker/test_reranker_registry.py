"""Kinds and losses are plug-ins: a toy loss defined here trains after one registration line; no reranker-kind
comparison outside ``reranker/kinds/`` and no loss-name literal outside ``reranker/losses/`` (parsed with ``ast``)."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from dpa_rag.reranker.kinds import kind_names, resolve_kind
from dpa_rag.reranker.losses.base import LossOptions, Remap, RerankerLoss, RowBuilder
from dpa_rag.reranker.losses.registry import (
    LOSS_NAMES,
    align_loss_names,
    authors_flags,
    default_losses,
    register_loss,
    unregister_loss,
    warmup_loss_name,
)
from toys import authors_train_records, write_rows

SRC = Path(__file__).resolve().parents[2] / "src" / "dpa_rag"


class ToyLoss(RerankerLoss):
    """Squared distance of each record's first positive's score from 1: one row per record."""

    name = "toy"

    @classmethod
    def from_options(cls, options: LossOptions) -> ToyLoss:
        return cls()

    @classmethod
    def add_rows(cls, records: Sequence[Any], rows: RowBuilder) -> dict[str, Any]:
        plan = {"rows": [rows.add(r.query, r.positive[0]) for r in records]}
        rows.end_group()
        return plan

    @classmethod
    def index_tensors(cls, plan: dict[str, Any], remap: Remap) -> dict[str, Tensor]:
        return {"toy_idx": torch.tensor(remap(plan["rows"]), dtype=torch.long)}

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        return ((out.take("logits", batch["toy_idx"])[:, -1] - 1.0) ** 2).mean()


@pytest.fixture()
def toy_loss():  # type: ignore[no-untyped-def]
    register_loss("toy", ToyLoss)  # the one registration line a new loss needs
    yield ToyLoss
    unregister_loss("toy")


@pytest.mark.parametrize("kind", ["cross-encoder", "bi-encoder"])
def test_a_toy_loss_registered_in_the_test_trains_with_mgda(tiny_bert_dir, run_dir, toy_loss, kind):
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    train = write_rows(run_dir / "train.jsonl", authors_train_records(4))
    out = train_reranker(TrainRerankerConfig(
        train=str(train), out_dir=str(run_dir / "o"), backbone=str(tiny_bert_dir), kind=kind,
        losses=["toy", "pair"], weighting="mgda", max_steps=2, batch_size=2, max_length=64,
    ))
    log = json.loads(out.train_log.read_text())
    assert log["losses"] == ["pair", "toy"]  # registration order
    assert len(log["steps"]) == 2
    for step in log["steps"]:
        assert set(step["losses"]) == {"pair", "toy"} and step["losses"]["toy"] >= 0
        assert sum(step["weights"].values()) == pytest.approx(1.0) and min(step["weights"].values()) >= 0
    assert '"toy"' in (out.model / "README.md").read_text()


def test_registry_names_flags_and_warmup_losses():
    assert LOSS_NAMES == ("point", "pair", "contrastive") and align_loss_names() == (*LOSS_NAMES, "listwise")
    assert default_losses() == ["point", "pair", "contrastive"]
    assert authors_flags() == {"cls_loss": "point", "rank_loss": "pair", "scl_loss": "contrastive"}
    assert warmup_loss_name("has-answer") == "relevance-ce" and warmup_loss_name("bm25") == "distill-kl"
    with pytest.raises(ValueError, match="already registered"):
        register_loss("point", ToyLoss)
    assert kind_names() == ("cross-encoder", "bi-encoder")
    with pytest.raises(ValueError, match="reranker kind must be one of"):
        resolve_kind("x", "dual")


def test_unknown_loss_is_rejected_by_the_config():
    from pydantic import ValidationError

    from dpa_rag.reranker.config import TrainRerankerConfig

    with pytest.raises(ValidationError, match="unknown loss"):
        TrainRerankerConfig(losses=["point", "toy"])


def _py_files(root: Path, skip: str) -> list[Path]:
    return [p for p in sorted(root.rglob("*.py")) if skip not in p.relative_to(SRC).as_posix()]


def _named_kind(node: ast.expr) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "kind" in name.lower()


def test_no_reranker_kind_comparison_outside_the_kinds_folder():
    kinds = set(kind_names())
    found = []
    for path in _py_files(SRC, "reranker/kinds/"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                consts = {s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)}
                if consts & kinds and any(_named_kind(s) for s in sides):  # kind == "bi-encoder", cfg.kind != ...
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "is_bi_encoder":
                found.append(f"{path.relative_to(SRC)}:{node.lineno} (is_bi_encoder)")
    assert not found, "reranker-kind branches outside reranker/kinds/ (ask the kind instead):\n" + "\n".join(found)


def test_no_loss_name_literal_outside_the_losses_folder():
    from dpa_rag.reranker.losses.registry import _REGISTRY

    names = set(_REGISTRY)
    found = []
    for sub in ("reranker", "pipeline", "cli", "rag", "mining"):
        for path in _py_files(SRC / sub, "reranker/losses/"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert not found, "loss names outside reranker/losses/ (loop over loss objects instead):\n" + "\n".join(found)
