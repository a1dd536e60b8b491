from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from dpa_rag.config import StageConfig
from dpa_rag.models import fingerprint, pick_dtype, resolve_encoder, resolve_llm
from dpa_rag.stage import manifest_matches, stage_recorder


class C(StageConfig):
    out_dir: str
    k: int = Field(1)
    cache_dir: str | None = None


def test_manifest_records_and_matches(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("data")
    cfg = C(out_dir=str(tmp_path / "s"))
    rec = stage_recorder("toy", cfg, cfg.out_dir, [inp])
    with rec.timer("work"):
        (tmp_path / "s" / "o.txt").write_text("x")
    rec.finish(outputs=["o.txt"], rows=1)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["counts"] == {"rows": 1} and "work" in m["timings_s"] and m["status"] == "complete"
    assert (tmp_path / "s" / "config.yaml").exists()
    assert manifest_matches(cfg.out_dir, cfg, [inp])
    # result-neutral fields do not invalidate; real ones do
    assert manifest_matches(cfg.out_dir, C(out_dir=cfg.out_dir, cache_dir="elsewhere"), [inp])
    assert not manifest_matches(cfg.out_dir, C(out_dir=cfg.out_dir, k=2), [inp])
    inp.write_text("changed")
    assert not manifest_matches(cfg.out_dir, cfg, [inp])
    inp.write_text("data")
    (tmp_path / "s" / "o.txt").unlink()
    assert not manifest_matches(cfg.out_dir, cfg, [inp])


def test_model_name_resolution(tmp_path):
    assert resolve_encoder("BAAI/bge-reranker-base") == "BAAI/bge-reranker-base"
    assert resolve_llm("Qwen/Qwen2-7B-Instruct") == "Qwen/Qwen2-7B-Instruct"
    assert (tmp_path / "x").exists() is False
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"1")
    f1 = fingerprint(str(d))
    (d / "model.safetensors").write_bytes(b"12")
    assert fingerprint(str(d)) != f1
    assert fingerprint("org/name") == "org/name"


def test_pick_dtype_explicit():
    import torch

    assert pick_dtype("float32") == torch.float32
    assert pick_dtype("bfloat16") == torch.bfloat16
    assert pick_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)


def test_bundled_aliases_resolve():
    enc = Path(resolve_encoder("minilm"))
    assert (enc / "config.json").exists() and (enc / "modules.json").exists()


@pytest.mark.slow
def test_bundled_llm_converts_once():
    path = Path(resolve_llm("smollm2-135m"))
    assert (path / "config.json").exists() and any(path.glob("*.safetensors"))
    assert (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    assert resolve_llm("smollm2-135m") == str(path)  # second call: no conversion, same folder


def test_started_stage_drops_its_old_manifest(tmp_path):
    cfg = C(out_dir=str(tmp_path / "s"))
    stage_recorder("toy", cfg, cfg.out_dir, []).finish(outputs=[])
    assert (tmp_path / "s" / "manifest.json").exists()
    rec = stage_recorder("toy", cfg, cfg.out_dir, [])  # created, nothing written yet: the finished run stays
    assert manifest_matches(cfg.out_dir, cfg)
    from dpa_rag.io import write_json

    write_json(tmp_path / "s" / "part.json", {})  # started producing, then killed before finish()
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not manifest_matches(cfg.out_dir, cfg) and rec.started
