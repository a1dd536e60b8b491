"""Bring your own retrieval: a pipeline step that takes an existing retrieval file instead of searching an index.

Reads DPR/FiD layouts (``question``, ``answers``, ``ctxs`` with or without ``has_answer``; lost-in-the-middle's
``hasanswer``) and FlashRAG's (``golden_answers``, ``retrieval_result`` with ``contents`` = ``"title"\\ntext``), keeps
the records of the given questions (matched by id, else by question text) in the questions' order, cuts each list to
``top_k`` and computes ``has_answer`` where the file has none (DPR's whole-word match). Writes ``retrieval.jsonl`` and
``retrieval_metrics.json`` like ``dpa-rag retrieve``, so every later step reads it unchanged.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from pydantic import Field

from dpa_rag.config import StageConfig
from dpa_rag.data.loaders import dedupe_ids_field, load_questions, load_retrieval
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.metrics import has_answer
from dpa_rag.io import DataError, read_records, write_json, write_jsonl
from dpa_rag.retrieval.retrieve import RetrieveOutputs, retrieval_metrics
from dpa_rag.stage import stage_recorder

__all__ = ["Config", "ImportRetrievalConfig", "Outputs", "import_retrieval", "run"]

logger = logging.getLogger(__name__)


class ImportRetrievalConfig(StageConfig):
    """A pipeline step that starts from a given retrieval file (``retrieval_file`` / ``eval_retrieval_file``)."""

    input: Path = Field(description="Retrieval file: DPR/FiD (ctxs) or FlashRAG (retrieval_result) layout.")
    questions: Path = Field(description="The questions to keep (the split's train or eval questions).")
    out_dir: Path = Field(Path("runs/retrieve"), description="Folder for retrieval.jsonl and retrieval_metrics.json.")
    top_k: int = Field(100, ge=1, description="Passages kept per question.")
    dedupe_ids: bool = dedupe_ids_field()


def _flashrag_to_dpr(path: Path) -> Path | None:
    """A DPR-layout copy of a FlashRAG file (``retrieval_result``), or ``None`` when the file is DPR already."""
    first = next(read_records(path), None)
    if first is None or "ctxs" in first[1] or "retrieval_result" not in first[1]:
        return None
    tmp = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    with tmp.open("w", encoding="utf-8") as fh:
        for pos, rec in read_records(path):
            ctxs = []
            for doc in rec.get("retrieval_result") or []:
                contents = str(doc.get("contents", ""))
                title, _, text = contents.partition("\n")
                ctxs.append({"id": str(doc.get("id", "")), "title": title.strip().strip('"'),
                             "text": text if text else title, "score": doc.get("score")})
            if not ctxs:
                raise DataError(f"{path}:{pos}: empty 'retrieval_result'")
            fh.write(json.dumps({**{k: v for k, v in rec.items() if k != "retrieval_result"}, "ctxs": ctxs}) + "\n")
    return tmp


def import_retrieval(
    path: Path, questions: Path, top_k: int, dedupe_ids: bool | None = None
) -> list[RetrievalRecord]:
    """The records of ``questions`` from the retrieval file ``path`` (see the module docstring)."""
    converted = _flashrag_to_dpr(path)
    try:
        records = load_retrieval(converted or path, dedupe_ids=dedupe_ids)
    finally:
        if converted is not None:
            converted.unlink(missing_ok=True)
    wanted = load_questions(questions, require_answers=False, dedupe_ids=dedupe_ids)
    by_id = {r.id: r for r in records}
    by_text = {r.question.strip().lower(): r for r in records}
    out: list[RetrievalRecord] = []
    missing: list[str] = []
    for q in wanted:
        rec = by_id.get(q.id) or by_text.get(q.question.strip().lower())
        if rec is None:
            missing.append(q.question)
            continue
        answers = rec.answers or q.answers
        ctxs = [
            c if c.has_answer is not None else c.model_copy(update={"has_answer": has_answer(c.text, answers)})
            for c in rec.ctxs[:top_k]
        ]
        out.append(rec.model_copy(update={"id": q.id, "answers": answers, "ctxs": ctxs, "origin_id": q.origin_id}))
    if missing:
        raise DataError(
            f"{path}: no retrieval record for {len(missing)} of {len(wanted)} questions of {questions} "
            f"(first: {missing[0]!r})"
        )
    return out


Config = ImportRetrievalConfig
Outputs = RetrieveOutputs  # the same files as `retrieve`, so every later step reads them unchanged


def run(cfg: ImportRetrievalConfig) -> RetrieveOutputs:
    """Stage entry point: write ``retrieval.jsonl`` and ``retrieval_metrics.json``."""
    rec = stage_recorder("import-retrieval", cfg, cfg.out_dir, [cfg.input, cfg.questions])
    with rec.timer("load"):
        records = import_retrieval(cfg.input, cfg.questions, cfg.top_k, dedupe_ids=cfg.dedupe_ids or None)
    out = RetrieveOutputs.at(cfg.out_dir)
    write_jsonl(out.retrieval, records)
    metrics = {"method": "file", "source": str(cfg.input), "top_k": cfg.top_k, **retrieval_metrics(records, cfg.top_k)}
    write_json(out.metrics, metrics)
    logger.info("retrieval from %s: %d questions, mrr %.3f", cfg.input, len(records), metrics["mrr"])
    rec.finish(outputs=list(RetrieveOutputs.FILES.values()), questions=len(records))
    return out

