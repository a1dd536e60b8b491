"""Merge a LoRA adapter into its base model, and find a folder that ``from_pretrained`` loads for inference.

A training run's ``out_dir`` holds ``adapter/`` (LoRA/QLoRA) or ``model/`` (full fine-tuning), optionally
``merged/``, and ``train_info.json`` naming the base model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TRAIN_INFO", "init_args_from", "load_for_inference", "merge_adapter", "read_train_info"]

logger = logging.getLogger(__name__)

TRAIN_INFO = "train_info.json"


def read_train_info(out_dir: str | Path) -> dict[str, Any]:
    """``train_info.json`` of a run (``{}`` if absent)."""
    path = Path(out_dir) / TRAIN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _adapter_base(adapter_dir: Path) -> str:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_path}: no base_model_name_or_path; pass the base model explicitly")
    return base


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None, dtype: str = "auto"
) -> Path:
    """Load the base model, apply the adapter, ``merge_and_unload`` and save a plain HF model plus tokenizer.

    Args:
        adapter_dir: a PEFT adapter folder (with ``adapter_config.json``).
        out_dir: where the merged model goes (written to a temporary folder first, then renamed).
        base_model: base model name or folder; default: the adapter's ``base_model_name_or_path``.
        dtype: ``auto`` (the checkpoint's dtype) or a torch dtype name.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = base_model or _adapter_base(adapter_dir)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    logger.info("merging %s into %s → %s", adapter_dir, base, out_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        from dpa_rag.io import respect_umask_tree

        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        respect_umask_tree(tmp)  # mkdtemp made it 0700 and the weights may be written 0600: give them the umask's
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_for_inference(out_dir: str | Path) -> str:
    """A folder that ``AutoModelForCausalLM.from_pretrained`` loads, from a ``train-llm`` output folder.

    Order: ``merged/``, ``model/`` (full fine-tuning), then ``adapter/`` merged into ``merged/`` on demand; a folder
    that is itself a model (has ``config.json``) is returned as is.

    Raises:
        FileNotFoundError: nothing loadable in ``out_dir``.
    """
    out_dir = Path(out_dir)
    for sub in ("merged", "model"):
        if (out_dir / sub / "config.json").exists():
            return str(out_dir / sub)
    if (out_dir / "adapter" / "adapter_config.json").exists():
        base = read_train_info(out_dir).get("base_model")
        return str(merge_adapter(out_dir / "adapter", out_dir / "merged", base_model=base))
    if (out_dir / "config.json").exists():
        return str(out_dir)
    raise FileNotFoundError(f"{out_dir}: no merged/, model/ or adapter/ folder from dpa-rag train-llm")


def init_args_from(prev_out_dir: str | Path) -> dict[str, str]:
    """How to start the next stage from a finished run: ``{"init_adapter": …}`` or ``{"init_model": …}``.

    A LoRA/QLoRA run continues its adapter; a full fine-tuning run passes its model folder.
    """
    prev = Path(prev_out_dir)
    if (prev / "adapter" / "adapter_config.json").exists():
        return {"init_adapter": str(prev / "adapter")}
    for sub in ("model", "merged"):
        if (prev / sub / "config.json").exists():
            return {"init_model": str(prev / sub)}
    raise FileNotFoundError(f"{prev}: no adapter/ or model/ folder to start the next stage from")
