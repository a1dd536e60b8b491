"""LLM self-alignment (``dpa_rag.llm``, ``dpa-rag train-llm``) on the tiny Llama fixture, plus one slow SmolLM2 run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpa_rag.config import ConfigError, load_config
from dpa_rag.io import DataError
from dpa_rag.llm import (
    TrainLLMConfig,
    build_model,
    build_trainer,
    check_lengths,
    init_args_from,
    load_examples,
    load_for_inference,
    recipe_path,
    resolve_chat_template,
    run,
)
from toys import write_rows

QA = [
    ("who wrote the song yesterday", "the beatles"),
    ("what is the capital of france", "paris"),
    ("who was born in germany and won the nobel prize in physics", "einstein"),
    ("which river is in egypt", "the nile"),
]


def _messages(q: str, a: str, system: str = "answer the question") -> dict:
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"question: {q}"},
            {"role": "assistant", "content": a},
        ]
    }


@pytest.fixture()
def qa_file(run_dir: Path) -> Path:
    return write_rows(run_dir / "sft.jsonl", [_messages(q, a) for q, a in QA])


def _cfg(tiny_llm_dir: Path, data: list[Path] | Path, out_dir: Path, **kw) -> TrainLLMConfig:
    base = {
        "model": str(tiny_llm_dir), "data": data, "out_dir": out_dir, "device": "cpu", "max_length": 128,
        "per_device_train_batch_size": 4, "logging_steps": 1, "max_steps": 2, "learning_rate": 1e-2,
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
    }
    base.update(kw)
    return TrainLLMConfig(**base)


# --------------------------------------------------------------------------------------------------- data checks


def test_alpaca_and_messages_are_converted(run_dir: Path) -> None:
    alpaca = run_dir / "a.json"
    alpaca.write_text(json.dumps([
        {"instruction": "answer", "input": "question: who wrote hamlet", "output": "shakespeare", "system": "sys"},
        {"instruction": "what is the capital of italy", "input": "", "output": "rome"},
    ]))
    msgs = write_rows(run_dir / "m.jsonl", [_messages("q1", "a1")])
    examples, report = load_examples([alpaca, msgs])
    assert report.records == 3 and len(examples) == 3
    assert examples[0].prompt == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "answer\n\nquestion: who wrote hamlet"}
    ]
    assert examples[0].completion == [{"role": "assistant", "content": "shakespeare"}]
    assert examples[1].prompt == [{"role": "user", "content": "what is the capital of italy"}]
    assert examples[2].position == f"{msgs}:1"


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"instruction": "q"}, "missing field 'output'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "missing field 'content'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unknown role"),
        ({"question": "q", "answer": "a"}, "expected a 'messages' list"),
    ],
)
def test_bad_record_names_file_and_line(run_dir: Path, bad: dict, needle: str) -> None:
    path = write_rows(run_dir / "bad.jsonl", [_messages("q", "a"), bad])
    with pytest.raises(DataError, match=needle) as err:
        load_examples([path])
    assert f"{path}:2" in str(err.value)


def test_empty_and_overlength_are_counted_warned_and_dropped(
    run_dir: Path, tiny_llm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    long_text = " ".join(["the capital of france"] * 60)
    records = [
        _messages(*QA[0]), _messages("q", "  "), _messages("q", long_text), _messages(*QA[1]),
        _messages(long_text, "a"),
    ]
    path = write_rows(run_dir / "d.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="dpa_rag.llm.data"):
        examples, report = load_examples([path])
        kept = check_lengths(examples, tok, 64, "drop", report)
    assert (report.records, report.empty_answers, report.overlength, report.overlength_dropped) == (5, 1, 2, 2)
    assert [e.position for e in kept] == [f"{path}:1", f"{path}:4"]
    assert report.positions["empty_answers"] == [f"{path}:2"]
    assert report.positions["overlength"][0].startswith(f"{path}:3 (")
    assert all(f"{path}:{i}" in caplog.text for i in (2, 3, 5))

    # truncate keeps a long answer (cut by the trainer) but not a prompt that alone fills the cutoff
    examples, report = load_examples([path])
    kept = check_lengths(examples, tok, 64, "truncate", report)
    assert [e.position for e in kept] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert (report.truncated, report.overlength_dropped) == (1, 1)
    examples, report = load_examples([path])
    with pytest.raises(DataError, match=f"{path}:3"):
        check_lengths(examples, tok, 64, "error", report)


def test_chat_templates(tiny_llm_dir: Path) -> None:
    from transformers import AutoTokenizer

    from dpa_rag.llm.templates import apply_chat_template_option

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    msgs = [{"role": "user", "content": "who"}, {"role": "assistant", "content": "me"}]
    apply_chat_template_option(tok, "alpaca", "tiny")
    assert tok.apply_chat_template(msgs, tokenize=False).startswith("### Instruction:\nwho")
    assert "[INST]" in resolve_chat_template("llama2")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template_option(tok, None, "tiny")
    with pytest.raises(ValueError, match="unknown chat template"):
        resolve_chat_template("no-such-template")


# --------------------------------------------------------------------------------------------------- training


def test_labels_mask_exactly_the_prompt_and_padding(run_dir: Path, tiny_llm_dir: Path, qa_file: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    trainer, report = build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "out"))
    assert report.kept == 4
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (attn == 0).any(), "the examples differ in length, so the batch must contain padding"
    for i, (q, a) in enumerate(QA):
        msgs = _messages(q, a)["messages"]
        n_prompt = len(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_dict=True)["input_ids"])
        n_total = int(attn[i].sum())
        assert 0 < n_prompt < n_total
        assert (labels[i, :n_prompt] == -100).all()
        assert torch.equal(labels[i, n_prompt:n_total], ids[i, n_prompt:n_total])
        assert (labels[i, n_total:] == -100).all()
        assert tok.decode(ids[i, n_prompt:n_total]) == f"{a}<|im_end|>\n"


def test_cpu_training_scores_only_the_labelled_positions(
    run_dir: Path, tiny_llm_dir: Path, qa_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the fused LM head projects only the answer's positions, with the loss and gradients of the model's own
    full-logits loss (TRL would score every prompt position there)."""
    import trl.trainer.utils as trl_utils

    trainer, _ = build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "out"))
    assert trl_utils._use_triton(torch.device("cpu")), "the CPU switch of TRL's fused LM head is not set"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel() / 2  # the prompts are most of the batch

    rows, apply = [], trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    with monkeypatch.context() as patch:
        patch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
        fused = model(**batch, fused_lm_head=True).loss
    assert rows == [labelled]
    params = [p for p in model.parameters() if p.requires_grad]
    fused_grads = torch.autograd.grad(fused, params)
    full = model(**batch).loss  # the model's own loss over the full logits
    full_grads = torch.autograd.grad(full, params)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_length_buckets_batch_similar_lengths_in_random_order() -> None:
    from dpa_rag.llm.data import LengthBuckets

    lengths = [50, 400, 55, 390, 60, 410, 52, 380, 58, 62, 57]
    sampler = LengthBuckets(lengths, batch_size=4, seed=3)
    batches = sampler.batches()
    flat = list(sampler)
    assert sorted(flat) == list(range(len(lengths))) and len(sampler) == len(lengths)
    assert flat == [i for b in batches for i in b]
    # full batches first (the loader cuts the flat order every 4), the three shortest as the short last batch
    assert [len(b) for b in batches] == [4, 4, 3] and sorted(batches[-1]) == [0, 2, 6]
    # each full batch spans the closest lengths: padding is a few tokens, where random batches pad ~350
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 35 for b in batches)
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
        assert list(sampler) == list(sampler)  # one epoch's order is fixed: a resumed run replays it
    assert len(orders) > 1  # the batch order changes between epochs
    with pytest.raises(ValueError, match="batch_size"):
        LengthBuckets(lengths, 0)


def test_group_by_length_trains_on_length_bucketed_batches(run_dir: Path, tiny_llm_dir: Path) -> None:
    short = [_messages(q, a) for q, a in QA]
    long = [_messages(" ".join([q] * 6), a) for q, a in QA]
    data = write_rows(run_dir / "mixed.jsonl", [r for pair in zip(short, long, strict=True) for r in pair])
    pad = {}
    for bucketed in (False, True):
        trainer, _ = build_trainer(_cfg(tiny_llm_dir, data, run_dir / f"out{bucketed}", per_device_train_batch_size=2,
                                        max_length=256, group_by_length=bucketed, max_steps=4))
        pad[bucketed] = sum(int((b["attention_mask"] == 0).sum()) for b in trainer.get_train_dataloader())
    # random batches mostly pair a short example with a long one; bucketed ones pair two short or two long
    assert pad[True] < pad[False] / 3, pad
    trainer.train()
    assert trainer.state.global_step == 4


def test_lora_top_layers_adapts_only_the_upper_layers(run_dir: Path, tiny_llm_dir: Path, qa_file: Path) -> None:
    def lora_modules(trainer) -> set[str]:
        names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert names and all(".lora_" in n for n in names)
        return {n.split(".lora_")[0].split("layers.")[1] for n in names}

    every, _ = build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "all"))
    top, _ = build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "top", lora_top_layers=1))
    # the tiny Llama has 2 layers: the same linear modules as all-linear, in layer 1 only
    assert lora_modules(top) == {m for m in lora_modules(every) if m.startswith("1.")}
    assert any(m.startswith("0.") for m in lora_modules(every))
    out = run(_cfg(tiny_llm_dir, qa_file, run_dir / "top-run", lora_top_layers=1))
    assert json.loads((out.adapter / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    # the next stage continues the same adapter, on the same layers
    sft, _ = build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "sft", init_adapter=out.adapter))
    assert lora_modules(sft) == lora_modules(top)
    # as many layers as the model has (or more) is every layer
    assert lora_modules(build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "two", lora_top_layers=2))[0]) == \
        lora_modules(every)


def test_continued_adapter_takes_this_runs_dropout_and_keeps_its_shape(
    run_dir: Path, tiny_llm_dir: Path, qa_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from peft.tuners.lora import LoraLayer

    def dropouts(model) -> set[float | None]:
        layers = [m.lora_dropout["default"] for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers
        return {getattr(d, "p", None) for d in layers}  # nn.Identity has no p

    prealign = run(_cfg(tiny_llm_dir, qa_file, run_dir / "p", lora_dropout=0.2))
    assert json.loads((prealign.adapter / "adapter_config.json").read_text())["lora_dropout"] == 0.2
    # PEFT alone would restore the saved 0.2; this run asks for none
    model, _ = build_model(_cfg(tiny_llm_dir, qa_file, run_dir / "s0", init_adapter=prealign.adapter))
    assert dropouts(model) == {None}
    model, _ = build_model(_cfg(tiny_llm_dir, qa_file, run_dir / "s1", init_adapter=prealign.adapter,
                                lora_dropout=0.1))
    assert dropouts(model) == {0.1}
    with caplog.at_level(logging.WARNING, logger="dpa_rag.llm.train"):
        sft = run(_cfg(tiny_llm_dir, qa_file, run_dir / "s2", init_adapter=prealign.adapter, lora_r=16))
    saved = json.loads((sft.adapter / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.0 and saved["r"] == 4  # the shape is the adapter's
    assert "keeps the adapter's own lora_r=4 (asked 16)" in caplog.text
    # rank and alpha as the adapter has them: nothing to warn about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpa_rag.llm.train"):
        build_model(_cfg(tiny_llm_dir, qa_file, run_dir / "s3", init_adapter=prealign.adapter))
    assert "keeps the adapter" not in caplog.text


def test_full_finetuning_overfits_four_examples(run_dir: Path, tiny_llm_dir: Path) -> None:
    records = [_messages(q, a) for q, a in QA]
    records.insert(1, _messages("q", ""))  # empty answer: dropped, reported
    records.append(_messages(" ".join(["who was the king of england"] * 40), "x"))  # over the cutoff: dropped
    data = write_rows(run_dir / "sft.jsonl", records)
    out = run(_cfg(tiny_llm_dir, data, run_dir / "full", method="full", learning_rate=3e-3, max_steps=30,
                   lr_scheduler_type="constant"))
    log = json.loads(out.train_log.read_text())
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 10 and losses[-1] < 0.5 * losses[0], losses
    report = json.loads(out.data_report.read_text())
    assert (report["records"], report["kept"], report["empty_answers"], report["overlength"]) == (6, 4, 1, 1)
    assert (out.model / "config.json").exists() and (out.out_dir / "loss.png").stat().st_size > 0
    manifest = json.loads((out.out_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["steps"] == 30
    assert load_for_inference(out.out_dir) == str(out.model)
    assert init_args_from(out.out_dir) == {"init_model": str(out.model)}
    # the next stage starts from these full weights, not from the base model
    from safetensors.torch import load_file

    trained = load_file(str(out.model / "model.safetensors"))
    start = init_args_from(out.out_dir)
    nxt, peft_config = build_model(_cfg(tiny_llm_dir, data, run_dir / "next", method="full", **start))
    assert peft_config is None
    state = nxt.state_dict()
    for k, v in trained.items():
        torch.testing.assert_close(state[k], v, atol=0, rtol=0)


@pytest.fixture()
def prealign_run(run_dir: Path, tiny_llm_dir: Path, qa_file: Path) -> Path:
    return run(_cfg(tiny_llm_dir, qa_file, run_dir / "prealign", stage="prealign", max_steps=3, merge=True)).out_dir


def _logits(model, tok) -> torch.Tensor:
    enc = tok(["the capital of france is paris", "who wrote the song"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_merged_model_matches_base_plus_adapter(prealign_run: Path, tiny_llm_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    merged_dir = load_for_inference(prealign_run)
    assert merged_dir == str(prealign_run / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    base_logits = _logits(base, tok)
    adapted = PeftModel.from_pretrained(base, str(prealign_run / "adapter")).eval()
    ref = _logits(adapted, tok)
    assert (ref - base_logits).abs().max() > 1e-3, "the adapter should change the model"
    torch.testing.assert_close(_logits(merged, tok), ref, atol=1e-4, rtol=0)
    # the merged folder carries the tokenizer with the chat template
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template


def test_sft_starts_from_the_prealigned_adapter(prealign_run: Path, tiny_llm_dir: Path, qa_file: Path) -> None:
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(prealign_run / "adapter" / "adapter_model.safetensors"))
    chain = init_args_from(prealign_run)
    assert chain == {"init_adapter": str(prealign_run / "adapter")}
    cfg2 = _cfg(tiny_llm_dir, qa_file, prealign_run.parent / "sft", **chain)
    model, peft_config = build_model(cfg2, "cpu")
    assert peft_config is None
    start = get_peft_model_state_dict(model)
    assert set(start) == set(saved) and any("lora_B" in k for k in saved)
    for k, v in saved.items():
        torch.testing.assert_close(start[k], v, atol=0, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    fresh_model, fresh_cfg = build_model(_cfg(tiny_llm_dir, qa_file, prealign_run.parent / "fresh"), "cpu")
    fresh = get_peft_model_state_dict(get_peft_model(fresh_model, fresh_cfg))
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved if "lora_B" in k)


def test_cli_two_stage_chain_and_recipes(run_dir: Path, tiny_llm_dir: Path, qa_file: Path) -> None:
    from dpa_rag.cli.main import app

    runner = CliRunner()
    common = ["--model", str(tiny_llm_dir), "--data", str(qa_file), "--max-steps", "2", "--cutoff", "128",
              "--lora-r", "4", "--lr", "1e-2"]
    res = runner.invoke(app, ["train-llm", "--config", "cpu_smollm2", "--stage", "prealign",
                              "--out-dir", str(run_dir / "p"), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-llm", "--config", "cpu_smollm2", "--stage", "sft",
                              "--init-adapter", str(run_dir / "p" / "adapter"),
                              "--out-dir", str(run_dir / "s"), *common])
    assert res.exit_code == 0, res.output
    cfg = json.loads((run_dir / "s" / "train_info.json").read_text())
    assert cfg["stage"] == "sft" and cfg["init_adapter"] == str(run_dir / "p" / "adapter")
    from safetensors.torch import load_file

    a = load_file(str(run_dir / "p" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "s" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a), "stage 2 should have trained"
    assert "lora_r: 4" in (run_dir / "s" / "config.yaml").read_text()  # CLI flag won over the recipe's 8
    assert not (run_dir / "s" / "merged").exists()
    assert load_for_inference(run_dir / "s") == str(run_dir / "s" / "merged")  # merged on demand
    assert (run_dir / "s" / "merged" / "config.json").exists()

    res = runner.invoke(app, ["train-llm", "--config", "no-such-recipe", "--data", str(qa_file)])
    assert res.exit_code == 2 and "no shipped recipe" in res.output
    res = runner.invoke(app, ["train-llm", "--stage", "mixed", "--data", str(qa_file)])
    assert res.exit_code == 2 and "mixed needs two data sets" in res.output


def test_mixed_stage_concatenates_and_shuffles(run_dir: Path, tiny_llm_dir: Path, qa_file: Path) -> None:
    pre = write_rows(
        run_dir / "prealign.jsonl", [_messages(f"is document {i} positive", "Positive") for i in range(4)]
    )
    trainer, report = build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "mixed", stage="mixed", data_extra=pre))
    assert report.kept == 8 and len(trainer.train_dataset) == 8
    tok = trainer.processing_class
    answers = [
        tok.decode([t for t in row["labels"] if t != -100]).split("<|im_end|>")[0] for row in trainer.train_dataset
    ]
    assert sorted(answers) == sorted([a for _, a in QA] + ["Positive"] * 4)
    assert answers != [a for _, a in QA] + ["Positive"] * 4, "the two sets should be shuffled together"


def test_recipes_and_guards(run_dir: Path, tiny_llm_dir: Path, qa_file: Path) -> None:
    paper = load_config(TrainLLMConfig, recipe_path("paper"), {"data": [str(qa_file)]})
    assert (paper.learning_rate, paper.num_train_epochs, paper.max_length, paper.warmup_steps) == (7e-6, 3, 8192, 20)
    assert (paper.weight_decay, paper.adam_beta2, paper.method, paper.bf16) == (0.1, 0.95, "full", True)
    assert paper.per_device_train_batch_size * paper.gradient_accumulation_steps * 8 == 128
    cpu = load_config(TrainLLMConfig, recipe_path("cpu_smollm2.yaml"), {"data": [str(qa_file)]})
    assert (cpu.lora_r, cpu.max_length, cpu.dtype, cpu.group_by_length) == (8, 768, "float32", True)
    with pytest.raises(ConfigError, match="shipped"):
        recipe_path("nope")
    with pytest.raises(ValueError, match="bitsandbytes|CUDA"):
        build_model(_cfg(tiny_llm_dir, qa_file, run_dir / "q", method="qlora"), "cpu")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ValueError, match="deepspeed"):
            build_trainer(_cfg(tiny_llm_dir, qa_file, run_dir / "ds", deepspeed="zero3"))


@pytest.mark.slow
def test_smollm2_two_lora_steps(run_dir: Path, qa_file: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpa_rag.models import resolve_llm

    cfg = TrainLLMConfig(
        model="smollm2-135m", data=[qa_file], out_dir=run_dir / "smol", device="cpu", dtype="float32",
        max_steps=2, per_device_train_batch_size=4, lora_r=4, lora_alpha=8, max_length=256, logging_steps=1,
    )
    out = run(cfg)
    base = AutoModelForCausalLM.from_pretrained(resolve_llm("smollm2-135m"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out.adapter))
    assert any("lora_B" in n for n, _ in model.named_parameters())
    losses = [e["loss"] for e in json.loads(out.train_log.read_text()) if "loss" in e]
    assert len(losses) >= 2 and all(0 < x < 20 for x in losses)
