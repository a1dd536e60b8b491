"""Kill and resume, stage by stage: a run killed mid-stage and re-run gives byte-identical outputs to a clean run, and
nothing finished is computed again (backend calls and scorer calls counted).

A kill is simulated in-process by a backend (or scorer) that raises ``KeyboardInterrupt`` at its n-th batch, like a
Ctrl-C, and for real by ``SIGKILL`` of a subprocess once its first chunk is on disk (no ``finally`` runs). Mining's
kill tests are in tests/mining/test_mining.py and tests/mining/test_loglik.py.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpa_rag.augment import filter as filter_mod
from dpa_rag.augment.augment import AugmentConfig
from dpa_rag.augment.augment import run as run_augment
from dpa_rag.augment.filter import FilterConfig
from dpa_rag.augment.filter import run as run_filter
from dpa_rag.generation.fake import FakeGenerator
from dpa_rag.io import write_jsonl
from dpa_rag.rag.answer import AnswerConfig
from dpa_rag.rag.answer import run as run_answer
from dpa_rag.reranker import rerank as rerank_mod
from dpa_rag.reranker.config import RerankConfig
from dpa_rag.reranker.model import load_reranker_model
from dpa_rag.reranker.rerank import run as run_rerank
from dpa_rag.sample import sample_path

STRATEGIES = ["rephrasing", "complexity", "sparql"]


class KilledGenerator(FakeGenerator):
    """The fake backend; raises ``KeyboardInterrupt`` when asked for its ``die_at``-th batch (1-based)."""

    def __init__(self, die_at: int | None = None, fn=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(fn=fn)
        self.die_at = die_at
        self.asked = 0

    def generate(self, prompts, params):  # type: ignore[no-untyped-def]
        self.asked += 1
        if self.die_at is not None and self.asked >= self.die_at:
            raise KeyboardInterrupt("simulated kill")
        return super().generate(prompts, params)


def rewriter(prompt: str) -> str:
    """A fake rewriter: a different rewrite per strategy, an echo for `complexity` on short questions."""
    question = prompt.rsplit("Question:", 1)[1].strip()
    if "SPARQL" in prompt:
        return f'SELECT ?a WHERE {{ ?q rdfs:label "{question}" ; :answer ?a . }}'
    if "more complex" in prompt:
        return question if len(question) < 30 else f"{question}, and in which year exactly?"
    return f"In other words, {question}?"


def _files(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ---------------------------------------------------------------- answer (resumes through the generation cache)


def _retrieval(path: Path, n: int = 9) -> Path:
    rows = []
    for i in range(n):
        ctxs = [
            {"id": f"p{i}-{j}", "title": f"Title {j}", "text": f"{['Paris', 'Berlin', 'Rome'][j]} is a city {i}",
             "score": 10.0 - j}
            for j in range(3)
        ]
        rows.append({"id": f"q{i}", "question": f"which city number {i}", "answers": ["Paris"], "ctxs": ctxs})
    write_jsonl(path, rows)
    return path


def _answer_cfg(run_dir: Path, name: str, retrieval: Path) -> AnswerConfig:
    return AnswerConfig(retrieval=retrieval, backend="fake", batch_size=2, top_k=2, out_dir=run_dir / name,
                        cache_dir=run_dir / f"cache-{name}", progress=False)


def test_answer_killed_then_resumed_is_identical(run_dir: Path) -> None:
    retrieval = _retrieval(run_dir / "retrieval.jsonl")
    clean_fake = KilledGenerator()
    run_answer(_answer_cfg(run_dir, "clean", retrieval), backend=clean_fake)
    assert clean_fake.calls == 9

    with pytest.raises(KeyboardInterrupt):
        run_answer(_answer_cfg(run_dir, "resumed", retrieval), backend=KilledGenerator(die_at=3))  # 2 batches done
    resumed_dir = run_dir / "resumed"
    assert not (resumed_dir / "predictions.jsonl").exists() and not (resumed_dir / "manifest.json").exists()
    assert not list(resumed_dir.glob(".*.tmp"))

    second = KilledGenerator()
    run_answer(_answer_cfg(run_dir, "resumed", retrieval), backend=second)
    assert second.calls == 9 - 4  # the 4 answered prompts came from the cache
    names = ["predictions.jsonl", "metrics.json"]
    assert _files(resumed_dir, names) == _files(run_dir / "clean", names)
    assert _manifest(resumed_dir)["counts"]["cache_hits"] == 4


# ---------------------------------------------------------------- augment (partial file + cache)


def _augment_cfg(run_dir: Path, name: str, **kw) -> AugmentConfig:  # type: ignore[no-untyped-def]
    return AugmentConfig(
        input=sample_path("questions.jsonl"), limit=8, strategies=STRATEGIES, backend="fake", chunk_size=3,
        batch_size=3, use_cache=False, out_dir=run_dir / name, progress=False, **kw,
    )


AUGMENT_OUTPUTS = ["augmented.jsonl", "questions_augmented.jsonl"]


def test_augment_killed_then_resumed_is_byte_identical(run_dir: Path) -> None:
    clean_fake = KilledGenerator(fn=rewriter)
    run_augment(_augment_cfg(run_dir, "clean"), backend=clean_fake)
    assert clean_fake.calls == 8 * 3

    # a chunk = 3 questions x 3 strategies = 9 prompts = 3 batches: die in the second chunk's second batch
    with pytest.raises(KeyboardInterrupt):
        run_augment(_augment_cfg(run_dir, "resumed"), backend=KilledGenerator(die_at=5, fn=rewriter))
    resumed_dir = run_dir / "resumed"
    assert not (resumed_dir / "augmented.jsonl").exists() and not (resumed_dir / "manifest.json").exists()
    second = KilledGenerator(fn=rewriter)
    run_augment(_augment_cfg(run_dir, "resumed"), backend=second)
    assert second.calls == (8 - 3) * 3  # no cache here: the finished chunk was skipped, not regenerated
    assert _files(resumed_dir, AUGMENT_OUTPUTS) == _files(run_dir / "clean", AUGMENT_OUTPUTS)
    assert not list(resumed_dir.glob("*.partial.*"))


_AUGMENT_CHILD = """
import time
from pathlib import Path
from dpa_rag.augment.augment import AugmentConfig, run
from dpa_rag.generation.fake import FakeGenerator

{rewriter}

class Stalls(FakeGenerator):
    def generate(self, prompts, params):
        if self.batches == 3:  # asked for the 4th batch: the first chunk (3 batches) is on disk
            Path({marker!r}).write_text("ready")
            time.sleep(600)
        return super().generate(prompts, params)

run(AugmentConfig(input={input!r}, limit=8, strategies={strategies!r}, backend="fake", chunk_size=3, batch_size=3,
                  use_cache=False, out_dir={out!r}, progress=False), backend=Stalls(fn=rewriter))
"""


def test_augment_sigkill_then_resumed_is_byte_identical(run_dir: Path) -> None:
    """A real kill -9 (no exception handler runs) once the first chunk is on disk."""
    run_augment(_augment_cfg(run_dir, "clean"), backend=KilledGenerator(fn=rewriter))
    out, marker = run_dir / "killed", run_dir / "ready"
    code = _AUGMENT_CHILD.format(
        rewriter=inspect.getsource(rewriter), marker=str(marker), input=str(sample_path("questions.jsonl")),
        out=str(out), strategies=STRATEGIES,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stdout.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.time() > deadline:
                pytest.fail("child never reached its first chunk")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert len((out / "augmented.partial.jsonl").read_text().splitlines()) == 3
    assert not (out / "augmented.jsonl").exists()
    second = KilledGenerator(fn=rewriter)
    run_augment(_augment_cfg(run_dir, "killed"), backend=second)
    assert second.calls == (8 - 3) * 3
    assert _files(out, AUGMENT_OUTPUTS) == _files(run_dir / "clean", AUGMENT_OUTPUTS)


# ---------------------------------------------------------------- filter (chunked scores)


def _augmented(path: Path) -> Path:
    rows = []
    for i in range(7):
        q = f"who was the first king of france number {i}"
        rows.append({
            "id": f"a{i}", "instruction": q, "answers": ["x"], "strategies": ["rephrasing", "complexity"],
            "back_instruction": [f"in other words who was the first king of france {i}", f"what is the moon {i}"],
            "failures": {},
        })
    rows[3]["back_instruction"][1] = ""  # an invalid rewrite: not scored
    write_jsonl(path, rows)
    return path


FILTER_OUTPUTS = ["augmented.jsonl", "questions_augmented.jsonl", "filter_report.json", "filter_report.md"]


@pytest.fixture()
def counted_scores(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Counts the scorer's loads and score calls; ``state["die_at"]`` makes the n-th call raise KeyboardInterrupt."""
    state = {"loads": 0, "calls": 0, "pairs": 0, "die_at": None}
    real = filter_mod._scorer

    def scorer(cfg):  # type: ignore[no-untyped-def]
        state["loads"] += 1
        inner = real(cfg)
        real_score = inner.score

        def score(a, b, progress=False):  # type: ignore[no-untyped-def]
            state["calls"] += 1
            if state["die_at"] is not None and state["calls"] >= state["die_at"]:
                raise KeyboardInterrupt("simulated kill")
            state["pairs"] += len(a)
            return real_score(a, b, progress=progress)

        inner.score = score
        return inner

    monkeypatch.setattr(filter_mod, "_scorer", scorer)
    return state


def _filter_cfg(run_dir: Path, name: str, encoder: Path, **kw) -> FilterConfig:  # type: ignore[no-untyped-def]
    return FilterConfig(input=run_dir / "aug.jsonl", out_dir=run_dir / name, encoder=str(encoder), device="cpu",
                        similarity_threshold=0.3, chunk_size=2, progress=False, **kw)


def test_filter_killed_then_resumed_is_byte_identical(run_dir: Path, tiny_bert_dir: Path, counted_scores) -> None:
    _augmented(run_dir / "aug.jsonl")
    run_filter(_filter_cfg(run_dir, "clean", tiny_bert_dir))
    assert counted_scores["calls"] == 4 and counted_scores["pairs"] == 13  # 7 records in chunks of 2

    counted_scores.update(calls=0, pairs=0, die_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_filter(_filter_cfg(run_dir, "resumed", tiny_bert_dir))
    resumed_dir = run_dir / "resumed"
    assert len((resumed_dir / "filter_scores.partial.jsonl").read_text().splitlines()) == 4
    assert not (resumed_dir / "augmented.jsonl").exists() and not (resumed_dir / "manifest.json").exists()

    counted_scores.update(calls=0, pairs=0, die_at=None)
    run_filter(_filter_cfg(run_dir, "resumed", tiny_bert_dir))
    assert counted_scores["calls"] == 2 and counted_scores["pairs"] == 13 - 7  # chunks 3 and 4 only
    assert _files(resumed_dir, FILTER_OUTPUTS) == _files(run_dir / "clean", FILTER_OUTPUTS)
    assert not list(resumed_dir.glob("*.partial.*"))


def test_filter_all_chunks_done_loads_no_model(
    run_dir: Path, tiny_bert_dir: Path, counted_scores, monkeypatch
) -> None:
    """Killed after the last chunk was scored, before the outputs: the re-run scores nothing and loads no model."""
    _augmented(run_dir / "aug.jsonl")
    run_filter(_filter_cfg(run_dir, "clean", tiny_bert_dir))
    real_filter = filter_mod.filter_records

    def die(*a, **kw):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(filter_mod, "filter_records", die)
    with pytest.raises(KeyboardInterrupt):
        run_filter(_filter_cfg(run_dir, "resumed", tiny_bert_dir))
    monkeypatch.setattr(filter_mod, "filter_records", real_filter)
    counted_scores.update(loads=0, calls=0)
    run_filter(_filter_cfg(run_dir, "resumed", tiny_bert_dir))
    assert counted_scores["loads"] == 0 and counted_scores["calls"] == 0
    assert _files(run_dir / "resumed", FILTER_OUTPUTS) == _files(run_dir / "clean", FILTER_OUTPUTS)


def test_filter_partial_from_other_config_is_discarded(run_dir: Path, tiny_bert_dir: Path, counted_scores) -> None:
    _augmented(run_dir / "aug.jsonl")
    counted_scores["die_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        run_filter(_filter_cfg(run_dir, "o", tiny_bert_dir, max_length=64))
    counted_scores.update(calls=0, pairs=0, die_at=None)
    run_filter(_filter_cfg(run_dir, "o", tiny_bert_dir))  # another config: the partial scores are not reused
    assert counted_scores["pairs"] == 13


# ---------------------------------------------------------------- rerank (chunked partial file)


@pytest.fixture(scope="module")
def cross_encoder(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny one-logit cross-encoder built from the tiny BERT."""
    out = tmp_path_factory.mktemp("tiny-cross-encoder")
    torch.manual_seed(0)
    model, tok = load_reranker_model(str(tiny_bert_dir), "single")  # type: ignore[arg-type]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def counted_rerank(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Counts :meth:`Reranker.rerank` calls (one per chunk) and records; ``state["die_at"]`` kills the n-th."""
    state = {"calls": 0, "records": 0, "die_at": None}
    real = rerank_mod.Reranker.rerank

    def rerank(self, records, top_k=None):  # type: ignore[no-untyped-def]
        state["calls"] += 1
        if state["die_at"] is not None and state["calls"] >= state["die_at"]:
            raise KeyboardInterrupt("simulated kill")
        state["records"] += len(records)
        return real(self, records, top_k)

    monkeypatch.setattr(rerank_mod.Reranker, "rerank", rerank)
    return state


def _rerank_cfg(run_dir: Path, name: str, model: Path, **kw) -> RerankConfig:  # type: ignore[no-untyped-def]
    base = {"input": str(run_dir / "retrieval.jsonl"), "model": str(model), "out_dir": str(run_dir / name),
            "top_k": 2, "device": "cpu", "dtype": "fp32", "records_per_chunk": 2, **kw}
    return RerankConfig(**base)


def test_rerank_killed_then_resumed_is_byte_identical(run_dir: Path, cross_encoder: Path, counted_rerank) -> None:
    _retrieval(run_dir / "retrieval.jsonl", n=7)
    clean = run_rerank(_rerank_cfg(run_dir, "clean", cross_encoder))
    assert counted_rerank["calls"] == 4

    counted_rerank.update(calls=0, records=0, die_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_rerank(_rerank_cfg(run_dir, "resumed", cross_encoder))
    resumed_dir = run_dir / "resumed"
    assert not (resumed_dir / "reranked.jsonl").exists() and not (resumed_dir / "manifest.json").exists()
    partial = resumed_dir / "reranked.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 4
    with open(partial, "a", encoding="utf-8") as fh:  # a third chunk cut by a kill: one line and a half
        fh.write(partial.read_text().splitlines()[0].replace('"q0"', '"q4"') + '\n{"id": "q5", "quest')

    counted_rerank.update(calls=0, records=0, die_at=None)
    out = run_rerank(_rerank_cfg(run_dir, "resumed", cross_encoder))
    assert counted_rerank == {**counted_rerank, "calls": 2, "records": 3}  # the cut chunk is redone whole
    assert out.reranked.read_bytes() == clean.reranked.read_bytes()
    assert not list(resumed_dir.glob("*.partial.*")) and not list(resumed_dir.glob(".*.tmp"))
    assert _manifest(resumed_dir)["counts"] == _manifest(run_dir / "clean")["counts"]


def test_rerank_partial_from_other_config_is_discarded(run_dir: Path, cross_encoder: Path, counted_rerank) -> None:
    _retrieval(run_dir / "retrieval.jsonl", n=5)
    clean = run_rerank(_rerank_cfg(run_dir, "clean", cross_encoder, top_k=1))
    counted_rerank.update(calls=0, records=0, die_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_rerank(_rerank_cfg(run_dir, "o", cross_encoder, top_k=3))
    counted_rerank.update(calls=0, records=0, die_at=None)
    out = run_rerank(_rerank_cfg(run_dir, "o", cross_encoder, top_k=1))
    assert counted_rerank["records"] == 5
    assert out.reranked.read_bytes() == clean.reranked.read_bytes()
    # a changed chunk size (result-neutral) keeps only the whole chunks of the new size
    counted_rerank.update(calls=0, records=0, die_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_rerank(_rerank_cfg(run_dir, "c", cross_encoder, top_k=1))
    counted_rerank.update(calls=0, records=0, die_at=None)
    run_rerank(_rerank_cfg(run_dir, "c", cross_encoder, top_k=1, records_per_chunk=3))
    assert counted_rerank["records"] == 5 - 3
