"""``train-reranker``'s held-out reports: the utility lists and the answer ranking of ``--eval-retrieval``'s held-out
questions, scored before, during and after training, and the retriever-fusion weight chosen on them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dpa_rag.reranker.evaluation import score_utility_lists
from dpa_rag.reranker.fusion import select_alpha
from dpa_rag.reranker.inference import record_lists, score_lists
from dpa_rag.reranker.metrics import answer_ranking_metrics, utility_metrics
from dpa_rag.reranker.model import CONFIG_KEY
from dpa_rag.reranker.processes import Ranks

__all__ = ["HeldOut", "fusion_weight", "held_out_records"]

logger = logging.getLogger(__name__)


@dataclass
class HeldOut:
    """The held-out reports of the model before, during and after training: the utility lists (``--utility-test``,
    else ``--utility-valid``) and the answer ranking of ``--eval-retrieval``'s held-out questions, scored with
    :mod:`dpa_rag.reranker.inference` by the processes that score
    (:attr:`~dpa_rag.reranker.processes.Ranks.scores`)."""

    cfg: Any
    ranks: Ranks
    utility: list | None = None
    records: list | None = None
    utility_report: dict[str, dict[str, float]] = field(default_factory=dict)
    retrieval_report: dict[str, dict[str, float]] = field(default_factory=dict)

    def retrieval_scores(self, model: Any, tokenizer: Any) -> list[list[float]]:
        c = self.cfg
        return score_lists(model, tokenizer, record_lists(self.records or []), c.per_device_eval_batch_size,
                           c.max_length, c.score)

    def add(self, model: Any, tokenizer: Any, utility_row: str | None, retrieval_row: str | None) -> None:
        """Score ``model`` and add a row to each report (``None``: not to that one)."""
        if not self.ranks.scores:
            return
        c = self.cfg
        if self.utility and utility_row:
            self.utility_report[utility_row] = utility_metrics(self.utility, score_utility_lists(
                model, tokenizer, self.utility, c.per_device_eval_batch_size, c.max_length, c.score))
        if self.records is not None and retrieval_row:
            self.retrieval_report[retrieval_row] = answer_ranking_metrics(
                self.records, self.retrieval_scores(model, tokenizer))

    def baselines(self, model: Any, tokenizer: Any) -> None:
        """The retriever's order, the oracle's (utility) and the untrained model."""
        if not self.ranks.scores:
            return
        if self.utility:
            self.utility_report["retriever order"] = utility_metrics(self.utility, "retriever")
            self.utility_report["oracle (largest gain first)"] = utility_metrics(self.utility, "oracle")
        if self.records is not None:
            self.retrieval_report["retriever order"] = answer_ranking_metrics(self.records)
        self.add(model, tokenizer, "untrained model", "backbone (untrained)")


def held_out_records(records: list, train: list, source: str) -> list:
    """``records`` without the questions the reranker trains on (normalised match), so its report is held out."""
    from dpa_rag.eval.metrics import normalize_answer

    seen = {normalize_answer(r.query) for r in train}
    kept = [r for r in records if normalize_answer(r.question) not in seen]
    if len(kept) < len(records):
        logger.info("%s: %d of %d questions are training questions; the ranking report and the fusion weight use "
                    "the other %d", source, len(records) - len(kept), len(records), len(kept))
    return kept


def fusion_weight(model: Any, held: HeldOut, scores: list[list[float]]) -> dict[str, Any] | None:
    """The retriever-fusion weight chosen on the held-out questions (saved in the model's config), or ``None``."""
    alpha, table = select_alpha(held.records or [], scores)
    if alpha is None:
        logger.info("retriever fusion skipped: no held-out question has an answer-bearing passage")
        return None
    fusion = {"alpha": alpha, "prior": "-log(retriever rank)", "metric": "mrr",
              "questions": int(table[str(alpha)]["n_questions"]), "grid": table}
    held.retrieval_report[f"reranker + retriever fusion (alpha={alpha:g}, chosen on these questions)"] = (
        table[str(alpha)]
    )
    settings = dict(getattr(model.config, CONFIG_KEY, None) or {})
    settings["retriever_fusion"] = {k: fusion[k] for k in ("alpha", "prior", "metric", "questions")}
    setattr(model.config, CONFIG_KEY, settings)
    logger.info("retriever fusion: alpha=%g (1 = reranker only, 0 = retriever order), held-out MRR "
                "%.4f (retriever %.4f, reranker %.4f)", alpha, table[str(alpha)]["mrr"],
                table["0.0"]["mrr"], table["1.0"]["mrr"])
    return fusion
