"""Held-out validation of the reader in ``train-llm`` (dpa_rag.llm.validation), the checkpoint it keeps, and the
prompt the reader is trained on being the prompt it answers with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpa_rag.data.schema import Ctx, RetrievalRecord
from dpa_rag.llm import TrainLLMConfig, build_trainer, run
from dpa_rag.llm.validation import Validator, select_step
from dpa_rag.mining.llm_data import sft_example
from toys import write_rows

QA = [
    ("who wrote the song yesterday", "the beatles"),
    ("what is the capital of france", "paris"),
    ("which river is in egypt", "the nile"),
    ("who painted the mona lisa", "leonardo"),
]


def _inputs(folder: Path, wrong: bool = False) -> tuple[Path, Path]:
    """SFT examples built the answer step's way and the same questions as the validation set (their golds); with
    ``wrong`` the training targets are not the golds (a reader made worse on purpose)."""
    rows, recs = [], []
    for i, (q, a) in enumerate(QA):
        ctxs = [Ctx(id=f"p{i}", title="Fact", text=f"the answer is {a}")]
        rows.append(sft_example(q, ctxs, ["zebra crossing" if wrong else a]))
        recs.append({"id": f"q{i}", "question": q, "answers": [a], "ctxs": [c.model_dump() for c in ctxs]})
    return write_rows(folder / "sft.jsonl", rows), write_rows(folder / "valid.jsonl", recs)


def _cfg(tiny_llm_dir: Path, data: Path, valid: Path | None, out_dir: Path, **kw) -> TrainLLMConfig:
    base = {
        "model": str(tiny_llm_dir), "data": [data], "valid": valid, "out_dir": out_dir, "device": "cpu",
        "max_length": 256, "per_device_train_batch_size": 4, "logging_steps": 1, "lr_scheduler_type": "constant",
        "valid_max_new_tokens": 8,
    }
    return TrainLLMConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- selection rule


def test_select_step_rules() -> None:
    base = {"hits@1": 50.0, "em": 0.0, "f1": 20.0}
    rows = [
        {"step": 0, "hits@1": 50.0, "f1": 20.0},
        {"step": 4, "hits@1": 45.0, "f1": 60.0},  # best F1, but loses Hits@1
        {"step": 8, "hits@1": 55.0, "f1": 40.0},
        {"step": 12, "hits@1": 60.0, "f1": 40.0},  # same F1 as step 8: the earlier one wins
    ]
    assert select_step(rows, base) == 8
    assert select_step(rows, base, hit_tolerance=5.0) == 4
    assert select_step(rows, base, rule="hits") == 12
    assert select_step(rows, base, rule="final") == 12
    worse = [{"step": 0, "hits@1": 40.0, "f1": 10.0}, {"step": 5, "hits@1": 30.0, "f1": 50.0}]
    assert select_step(worse, base) == 0  # nothing eligible: the starting weights
    # closed-book answers lost (forgetting) make a step ineligible when asked to
    closed_base = {**base, "closed_book_hits@1": 30.0}
    forgets = [{"step": 0, "hits@1": 50.0, "f1": 20.0, "closed_book_hits@1": 30.0},
               {"step": 3, "hits@1": 60.0, "f1": 50.0, "closed_book_hits@1": 20.0}]
    assert select_step(forgets, closed_base) == 3  # by default forgetting is reported, not decisive
    assert select_step(forgets, closed_base, closed_book=True) == 0
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_step(rows, base, rule="best")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- validation while training


def test_validation_runs_at_the_configured_steps_and_the_kept_weights_answer_as_recorded(
    run_dir: Path, tiny_llm_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, valid = _inputs(run_dir)
    out = run(_cfg(tiny_llm_dir, data, valid, run_dir / "full", method="full", learning_rate=3e-3, max_steps=30,
                   eval_steps=10))
    result = json.loads(out.validation.read_text())
    assert [r["step"] for r in result["steps"]] == [0, 10, 20, 30]
    assert result["selected_step"] == select_step(result["steps"], result["base"], "f1-no-hit-loss") > 0
    assert result["selected"]["f1"] > result["base"]["f1"]  # it learnt the answers from the passages
    metrics = {"hits@1", "em", "f1"}
    assert set(result["versus_base"]) == metrics | {f"closed_book_{m}" for m in metrics}
    for name in ("validation.md", "validation.png", "valid_predictions.jsonl"):
        assert (out.out_dir / name).stat().st_size > 0
    assert "Held-out validation" in (out.model / "README.md").read_text()
    info = json.loads(out.info.read_text())
    assert info["validation"]["selected_step"] == result["selected_step"]
    # the saved weights are the kept step's: they answer the validation questions with the recorded scores
    tok = AutoTokenizer.from_pretrained(out.model)
    model = AutoModelForCausalLM.from_pretrained(out.model, dtype=torch.float32)
    records = [RetrievalRecord.model_validate(json.loads(x)) for x in valid.read_text().splitlines()]
    again, _ = Validator(records, tok, max_new_tokens=8, closed_book=True).evaluate(model)
    assert again == result["selected"]
    assert {"closed_book_hits@1", "closed_book_f1"} <= set(result["base"])  # forgetting is measured too


def test_a_reader_made_worse_keeps_its_starting_weights(run_dir: Path, tiny_llm_dir: Path) -> None:
    from safetensors.torch import load_file

    data, valid = _inputs(run_dir, wrong=True)
    out = run(_cfg(tiny_llm_dir, data, valid, run_dir / "lora", learning_rate=1e-2, max_steps=6, eval_steps=3,
                   lora_r=4, lora_alpha=8, lora_dropout=0.0))
    result = json.loads(out.validation.read_text())
    assert [r["step"] for r in result["steps"]] == [0, 3, 6]
    assert result["selected_step"] == 0
    adapter = load_file(str(out.adapter / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # LoRA starts at B = 0: step 0 restored
    log = json.loads(out.train_log.read_text())
    assert [e["step"] for e in log if "loss" in e][-1] == 6  # it did train; the kept weights are step 0's


def test_lora_validation_answers_through_merged_weights_and_restores_them_exactly(
    run_dir: Path, tiny_llm_dir: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from dpa_rag.llm.train import merged_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, 0.5)  # an adapter that changes the outputs
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        with merged_lora(model):
            assert layers and all(m.merged for m in layers)
            merged = model(input_ids=ids).logits
        with model.disable_adapter(), merged_lora(model):  # the base reader's pass: nothing to merge
            assert not any(m.merged for m in layers)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not any(m.merged for m in layers)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert not changed  # bit for bit, not a float-rounded unmerge

    # end to end: the merged/ model the stage writes answers the validation questions as the run recorded
    from transformers import AutoTokenizer

    data, valid = _inputs(run_dir)
    out = run(_cfg(tiny_llm_dir, data, valid, run_dir / "lora", learning_rate=1e-2, max_steps=4, eval_steps=2,
                   lora_r=4, lora_alpha=8, lora_dropout=0.0, merge=True))
    result = json.loads(out.validation.read_text())
    assert [r["step"] for r in result["steps"]] == [0, 2, 4]
    records = [RetrievalRecord.model_validate(json.loads(x)) for x in valid.read_text().splitlines()]
    kept = AutoModelForCausalLM.from_pretrained(out.merged, dtype=torch.float32)
    again, _ = Validator(records, AutoTokenizer.from_pretrained(out.merged), max_new_tokens=8,
                         closed_book=True).evaluate(kept)
    assert again == result["selected"]


def test_without_valid_nothing_changes(run_dir: Path, tiny_llm_dir: Path) -> None:
    data, _ = _inputs(run_dir)
    out = run(_cfg(tiny_llm_dir, data, None, run_dir / "plain", learning_rate=1e-2, max_steps=1))
    assert not out.validation.exists() and "validation" not in json.loads(out.info.read_text())


# ----------------------------------------------------------------------- the training prompt is the answer prompt


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("template", ["qa", "dpa", "plain"])
def test_the_reader_is_trained_on_the_prompt_it_answers_with(
    run_dir: Path, tiny_llm_dir: Path, template: str, chat: bool
) -> None:
    """Token for token: TRL's tokenized training prompt (the part without loss) equals what the answer step sends
    the reader (``build_prompts`` → ``HFGenerator.encode``) for the same question and passages."""
    from dpa_rag.generation.hf import HFGenerator
    from dpa_rag.prompts import load_template
    from dpa_rag.rag.answer import build_prompts

    ctxs = [Ctx(id="a", title="Paris", text="the capital of france is paris"),
            Ctx(id="b", title="", text="an untitled passage about rivers")]
    question, answer = "what is the capital of france", "paris"
    data = write_rows(run_dir / "sft.jsonl", [sft_example(question, ctxs, [answer], template=template, chat=chat)])
    trainer, _ = build_trainer(_cfg(tiny_llm_dir, data, None, run_dir / "out", max_steps=1))
    batch = trainer.data_collator([trainer.train_dataset[0]])  # what the model is trained on: loss on labels != -100
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = next(i for i, label in enumerate(labels) if label != -100)
    trained_prompt = ids[:n_prompt]
    record = RetrievalRecord(id="q", question=question, answers=[answer], ctxs=ctxs)
    prompt = build_prompts([record], load_template(template), top_k=2, chat=chat)[0]
    generator = HFGenerator.from_model(trainer.model, trainer.processing_class)
    assert trained_prompt == generator.encode(prompt)
    completion = trainer.processing_class.decode(ids[n_prompt:])
    assert completion.startswith(answer) and completion.rstrip().endswith("<|im_end|>")
