"""The bi-encoder reranker kind: any sentence-transformers embedding model, score = scaled cosine (method.md §13).

A cross-encoder built on an embedding backbone (the bundled MiniLM) starts from a random head and ranks far below
the retriever until it has seen a lot of relevance data. A bi-encoder reranker starts where the dense retriever is:

    logit(q, d) = s · cos(E(q), E(d)) + b

with a learnable scale ``s`` (initialised at 20, as sentence-transformers' MultipleNegativesRankingLoss) and bias
``b`` (only the point-wise BCE sees it). The same three losses train it: point-wise BCE on the logit, pair-wise
logistic on logit differences (the bias cancels), and SupCon on the L2-normalised passage embeddings (pairs anchor) or
with the query embedding as the anchor. MGDA runs over the shared encoder's parameters as for the cross-encoder.

Batches (:class:`BiEncoderCollator`) keep the cross-encoder's layout of loss inputs — one *pair row* per (query,
passage) — but tokenise each distinct text once: ``text_input_ids``/``text_attention_mask`` hold the texts (sorted by
length for chunked forwards), ``pair_query``/``pair_doc`` map each pair row to its query and passage text
(``pair_doc = -1``: the query alone, for the query-anchored contrastive loss).

Saved folders are plain sentence-transformers models (``SentenceTransformer(path)`` loads them; the inference score is
their cosine similarity) plus ``dpa_rag_reranker.json`` with the kind, ``s``, ``b`` and the retriever-fusion weight.
``sentence_transformers.CrossEncoder(path)`` refuses them (:data:`CROSS_ENCODER_GUARD`) instead of putting a random
classification head on the encoder.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpa_rag.data.reranker_records import RerankerTrainRecord
from dpa_rag.reranker.model import CROSS_ENCODER_GUARD

__all__ = [
    "BIENCODER_FILE",
    "BiEncoderCollator",
    "BiEncoderReranker",
    "encode_bi",
    "is_biencoder_folder",
    "is_embedding_model",
    "load_biencoder",
    "score_bi",
    "unwrap_biencoder",
]

logger = logging.getLogger(__name__)

BIENCODER_FILE = "dpa_rag_reranker.json"


class _Config:
    """The little of a transformers config the trainer and the reports read (``num_labels``, ``model_type``)."""

    num_labels = 1
    model_type = "bi-encoder"

    def __init__(self) -> None:
        self.dpa_rag: dict[str, Any] = {"kind": "bi-encoder", "head": "single", "score": "cosine"}

    def get_text_config(self, *args: Any, **kwargs: Any) -> _Config:
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "num_labels": self.num_labels, "dpa_rag": self.dpa_rag}

    def to_json_string(self, *args: Any, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class BiEncoderReranker(nn.Module):
    """A sentence-transformers model with a learnable score scale and bias.

    Args:
        st: the ``SentenceTransformer`` (its modules are trained).
        scale: initial ``s``.
        bias: initial ``b`` (default ``-s/2``: a cosine of 0.5 is the point-wise decision boundary).
        learn_scale: train ``s`` (else fixed).
    """

    def __init__(self, st: Any, scale: float = 20.0, bias: float | None = None, learn_scale: bool = True) -> None:
        super().__init__()
        self.st = st
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)
        self.bias = nn.Parameter(torch.tensor(-scale / 2 if bias is None else bias))
        self.config = _Config()

    @property
    def base_model(self) -> nn.Module:
        """The shared transformer encoder (MGDA's parameters; the scale and bias are the "head")."""
        return self.st[0].auto_model

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    @property
    def tokenizer(self) -> Any:
        return self.st.tokenizer

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> dict:
        """``{"embedding": L2-normalised sentence embeddings [T, H], "tokens": token embeddings [T, L, H]}``."""
        feats: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            feats["token_type_ids"] = token_type_ids
        out = self.st(feats)
        return {"embedding": F.normalize(out["sentence_embedding"].float(), dim=-1), "tokens": out["token_embeddings"]}

    def logits(self, query: Tensor, doc: Tensor) -> Tensor:
        """``s · cos + b`` of row-aligned normalised embeddings, shape ``[N, 1]``."""
        return (self.scale * (query * doc).sum(-1) + self.bias).unsqueeze(-1)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """A sentence-transformers folder plus :data:`BIENCODER_FILE` (kind, scale, bias and ``extra``)."""
        path = Path(path)
        self.st.save(str(path))
        config = _read_json(path / "config.json")
        if config:  # refuse CrossEncoder(path) (see CROSS_ENCODER_GUARD)
            config["sentence_transformers"] = dict(CROSS_ENCODER_GUARD)
            (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        settings = {**self.config.dpa_rag, "scale": float(self.scale.detach()), "bias": float(self.bias.detach()),
                    **(extra or {})}
        (path / BIENCODER_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_biencoder_folder(path: str | Path) -> bool:
    """A folder saved by this module (it has :data:`BIENCODER_FILE`)."""
    return (Path(path) / BIENCODER_FILE).is_file()


def is_embedding_model(path: str | Path) -> bool:
    """A local sentence-transformers folder (``modules.json``) whose config has no sequence-classification head."""
    p = Path(path)
    if not (p / "modules.json").is_file():
        return False
    archs = _read_json(p / "config.json").get("architectures") or []
    return not any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_biencoder(path: str, device: str | None = None, max_length: int | None = None) -> BiEncoderReranker:
    """A :class:`BiEncoderReranker` from a bundled alias, hub id or folder (saved scale/bias restored if present).

    A plain HF encoder without sentence-transformers modules gets mean pooling (sentence-transformers' default).
    """
    from sentence_transformers import SentenceTransformer

    from dpa_rag.models import resolve_encoder

    folder = resolve_encoder(path)
    st = SentenceTransformer(folder, device=device or "cpu")
    if max_length:
        st.max_seq_length = min(int(max_length), st.max_seq_length or max_length)
    saved = _read_json(Path(folder) / BIENCODER_FILE) if Path(folder).is_dir() else {}
    model = BiEncoderReranker(st, scale=float(saved.get("scale", 20.0)), bias=saved.get("bias"))
    for key, value in saved.items():
        if key not in ("scale", "bias"):
            model.config.dpa_rag[key] = value
    return model


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[dict[str, Tensor], list[int]]:
    """Tokenise ``texts`` (truncated to ``max_length``), rows sorted by length (longest first, stable).

    Returns:
        ``(batch, row_of)``: padded ``input_ids``/``attention_mask`` (+ ``token_type_ids``) and each text's row.
    """
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    row_of = [0] * len(ids)
    for row, i in enumerate(order):
        row_of[i] = row
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = {
        "input_ids": _pad([ids[i] for i in order], pad_id),
        "attention_mask": _pad([[1] * len(ids[i]) for i in order], 0),
    }
    if "token_type_ids" in enc:
        batch["token_type_ids"] = _pad([enc["token_type_ids"][i] for i in order], 0)
    return batch, row_of


class BiEncoderCollator:
    """Collate records for the bi-encoder: the cross-encoder's loss-input layout over pair rows, texts encoded once.

    Args:
        tokenizer: the sentence-transformers model's tokenizer.
        losses: enabled losses.
        max_length: truncation length of one text (query or passage).
        query_anchor: add query-alone rows (query-anchored contrastive loss).
        grouped: keep the groups' pair rows apart and unduplicated (``group_bounds`` valid: per-group passes for
            ``mgda``); otherwise identical pairs share a row.
    """

    def __init__(
        self, tokenizer: Any, losses: Sequence[str], max_length: int = 256, query_anchor: bool = False,
        grouped: bool = False,
    ) -> None:
        from dpa_rag.reranker.data import FusedCollator

        self._layout = FusedCollator(tokenizer, losses, max_length, query_anchor=query_anchor, sort=False,
                                     dedupe=not grouped)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.grouped = grouped

    def __call__(self, records: Sequence[RerankerTrainRecord]) -> dict[str, Any]:
        if not records:
            raise ValueError("BiEncoderCollator got an empty batch")
        rows, plans = self._layout.rows(records)
        pairs = rows.texts
        strings = list(dict.fromkeys([q for q, _ in pairs] + [d for _, d in pairs if d is not None]))
        where = {s: i for i, s in enumerate(strings)}
        batch, row_of = tokenize_texts(self.tokenizer, strings, self.max_length)
        out: dict[str, Any] = {f"text_{k}": v for k, v in batch.items()}
        out["pair_query"] = torch.tensor([row_of[where[q]] for q, _ in pairs], dtype=torch.long)
        out["pair_doc"] = torch.tensor([row_of[where[d]] if d is not None else -1 for _, d in pairs], dtype=torch.long)
        out.update(self._layout.index_tensors(plans, range(len(pairs))))  # pair rows stay in layout order
        out["group_bounds"] = [list(b) for b in rows.bounds]
        out["grouped"] = self.grouped
        out["n_pairs"] = len(pairs)
        return out


def unwrap_biencoder(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (``.module``), up to a :class:`BiEncoderReranker`."""
    while hasattr(model, "module") and not isinstance(model, BiEncoderReranker):
        model = model.module
    return model


def encode_bi(model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None,
              rows: tuple[int, int] | None = None) -> Any:
    """Encode a :class:`BiEncoderCollator` batch: the :class:`~dpa_rag.reranker.model.EncodeOutput` of its pair rows.

    ``logits`` = ``s · cos + b`` per pair row, ``reps`` = the passage embedding (the query's for query-alone rows),
    ``hidden`` = the token-embedding tensor of each forward chunk (the shared representation of ``mgda-ub``).
    ``rows``: only the pair rows ``[start, end)`` (and only the texts they use are encoded); indices stay global.
    """
    from dpa_rag.reranker.model import EncodeOutput

    core = unwrap_biencoder(model)
    q_idx, d_idx = batch["pair_query"], batch["pair_doc"]
    start, end = rows if rows is not None else (0, int(q_idx.shape[0]))
    q_idx, d_idx = q_idx[start:end], d_idx[start:end]
    needed = torch.unique(torch.cat([q_idx, d_idx[d_idx >= 0]]))  # sorted: texts are length-sorted, so are these
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if f"text_{k}" in batch]
    feats = {k: batch[f"text_{k}"][needed] for k in keys}
    n = int(needed.shape[0])
    step = n if not chunk_size or chunk_size >= n else chunk_size
    embs, hidden = [], []
    for s in range(0, n, step):
        part = {k: v[s : s + step] for k, v in feats.items()}
        width = int(part["attention_mask"].sum(dim=1).max().item())
        out = model(**{k: v[:, :width] for k, v in part.items()})
        embs.append(out["embedding"])
        hidden.append(out["tokens"])
    emb = torch.cat(embs) if len(embs) > 1 else embs[0]
    local = torch.full((int(batch["text_input_ids"].shape[0]),), -1, dtype=torch.long, device=needed.device)
    local[needed] = torch.arange(n, device=needed.device)
    query = emb[local[q_idx]]
    doc = torch.where((d_idx >= 0).unsqueeze(-1), emb[local[d_idx.clamp(min=0)]], query)
    logits = core.logits(query, doc)
    if rows is not None and start > 0:  # keep global row indices valid: pad the rows before this group
        logits = torch.cat([logits.new_zeros(start, 1), logits])
        doc = torch.cat([doc.new_zeros(start, doc.shape[1]), doc])
    return EncodeOutput(logits, doc, hidden)


def encode_bi_groups(model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None) -> Any:
    """One encoding per group of pair rows (``group_bounds``): a loss's gradient then only sees its own group."""
    from dpa_rag.reranker.model import EncodeOutput

    parts, bounds = [], []
    for start, end in batch["group_bounds"]:
        if end <= start:
            continue
        out = encode_bi(model, batch, chunk_size, rows=(start, end))
        parts.append(EncodeOutput(out.logits[start:end], out.reps[start:end], out.hidden))
        bounds.append((start, end))
    return EncodeOutput(
        torch.cat([p.logits for p in parts]), torch.cat([p.reps for p in parts]), [h for p in parts for h in p.hidden],
        parts=parts, bounds=bounds,
    )


def score_bi(model: BiEncoderReranker, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
             max_length: int | None = None, cosine: bool = False) -> Tensor:
    """Scores of ``(query, passage)`` pairs in input order (each distinct text encoded once): ``s · cos + b`` as
    ``[N, 1]`` logits, or the plain cosine (``cosine=True``, shape ``[N]``). Eval mode for the call, restored after."""
    if not pairs:
        return torch.zeros(0) if cosine else torch.zeros(0, 1)
    strings = list(dict.fromkeys([q for q, _ in pairs] + [d for _, d in pairs]))
    where = {s: i for i, s in enumerate(strings)}
    own = model.st.max_seq_length or 512  # what SentenceTransformer(path) truncates at: the same scores
    limit = min(max_length, own) if max_length else own
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch, row_of = tokenize_texts(model.tokenizer, strings, limit)
            emb = torch.empty(len(strings), 0)
            chunks = []
            for s in range(0, len(strings), batch_size):
                part = {k: v[s : s + batch_size].to(device) for k, v in batch.items()}
                width = int(part["attention_mask"].sum(dim=1).max().item())
                chunks.append(model(**{k: v[:, :width] for k, v in part.items()})["embedding"].float().cpu())
            emb = torch.cat(chunks)
            q = emb[torch.tensor([row_of[where[a]] for a, _ in pairs])]
            d = emb[torch.tensor([row_of[where[b]] for _, b in pairs])]
            cos = (q * d).sum(-1)
            if cosine:
                return cos
            return (float(model.scale) * cos + float(model.bias)).unsqueeze(-1)
    finally:
        model.train(was)
