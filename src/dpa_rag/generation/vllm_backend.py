"""In-process vLLM (``pip install 'dpa-rag[vllm]'``, Linux + CUDA): fastest for large offline runs on one node.

Without the extra, serve the model with ``vllm serve MODEL`` and use the ``openai`` backend instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpa_rag.generation.base import GenerationParams, Prompt, prompt_to_text
from dpa_rag.generation.hf import truncate_at_stop
from dpa_rag.models import fingerprint, resolve_llm

__all__ = ["VLLMGenerator", "import_vllm"]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vllm backend needs vLLM (Linux + CUDA): pip install 'dpa-rag[vllm]'. Alternatively run `vllm serve MODEL` "
    "elsewhere and use --backend openai --base-url http://HOST:8000/v1"
)


def import_vllm() -> Any:
    """``import vllm``, or an ``ImportError`` naming the ``dpa-rag[vllm]`` extra."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


class VLLMGenerator:
    """A model run by ``vllm.LLM`` behind the :class:`~dpa_rag.generation.base.Generator` protocol.

    Chats are rendered with the tokenizer's chat template (``add_generation_prompt=True``) and sent as token ids, so
    special tokens written by the template are not added twice; plain strings are sent as text. vLLM schedules all
    prompts of a call at once (continuous batching).

    Args:
        model: a bundled alias, a hub id or a local folder.
        dtype: ``auto`` | ``bfloat16`` | ``float16`` | ``float32`` (passed to vLLM).
        tensor_parallel_size: GPUs to shard the model over.
        gpu_memory_utilization: fraction of GPU memory vLLM may take.
        max_model_len: context length cap (``None``: the model's).
        cache_dir: where bundled aliases are converted.
        **llm_kwargs: any other ``vllm.LLM`` argument.

    Attributes:
        model_id: ``vllm:`` + weights fingerprint + dtype (part of the cache key).
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        cache_dir: str | Path | None = None,
        **llm_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        self._vllm = vllm
        self.path = resolve_llm(model, cache_dir)
        self.dtype = dtype
        kwargs: dict[str, Any] = {
            "model": self.path,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            **llm_kwargs,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        logger.info("starting vLLM for %s (%s)", self.path, dtype)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = f"vllm:{fingerprint(self.path)}:{dtype}"

    def _input(self, prompt: Prompt) -> Any:
        if isinstance(prompt, str):
            return prompt
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return {"prompt_token_ids": list(self.tokenizer(text, add_special_tokens=False)["input_ids"])}
        return prompt_to_text(prompt)

    def sampling_params(self, params: GenerationParams) -> Any:
        """``vllm.SamplingParams`` for ``params`` (temperature 0 is greedy in vLLM)."""
        return self._vllm.SamplingParams(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p if not params.greedy else 1.0,
            stop=list(params.stop) or None,
            seed=params.seed,
        )

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        """One completion per prompt, in order."""
        if not prompts:
            return []
        outputs = self.llm.generate([self._input(p) for p in prompts], self.sampling_params(params), use_tqdm=False)
        return [truncate_at_stop(o.outputs[0].text, params.stop).strip() for o in outputs]

    def __repr__(self) -> str:
        return f"VLLMGenerator({self.path!r}, dtype={self.dtype!r})"
