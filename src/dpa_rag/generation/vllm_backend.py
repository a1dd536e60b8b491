"""In-process vLLM (``pip install 'dpa-rag[vllm]'``, Linux + CUDA): fastest for large offline runs on one node.

Without the extra, serve the model with ``vllm serve MODEL`` and use the ``openai`` backend instead.
Answer scoring (:meth:`VLLMGenerator.loglik`) uses vLLM's prompt logprobs: one prefill per pair, no generation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpa_rag.generation.base import GenerationParams, LoglikUnsupported, Prompt, prompt_to_text
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
        self.max_model_len = max_model_len
        self._warned_truncation = False

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

    # -- answer scoring ---------------------------------------------------------------------------------------------

    def _context_len(self) -> int | None:
        """The engine's context length (``max_model_len``), or ``None`` when vLLM does not say."""
        try:
            value = self.llm.llm_engine.model_config.max_model_len
        except AttributeError:
            value = None
        if isinstance(value, int) and value > 0:
            return value
        return self.max_model_len

    def encode_pair(self, prompt: Prompt, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the rendered prompt and of ``continuation`` as its answer, exactly as
        :meth:`~dpa_rag.generation.hf.HFGenerator.encode_pair` builds them.

        The prompt is rendered as for :meth:`generate` (chat template with the generation prompt; special tokens added
        only where no template wrote them), the continuation is tokenised on its own without special tokens, and the
        prompt is left-truncated (with a warning, once) so that both plus the one token vLLM must generate fit.
        """
        tok = self.tokenizer
        cont = list(tok(continuation, add_special_tokens=False)["input_ids"])
        if not cont:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        templated = not isinstance(prompt, str) and bool(getattr(tok, "chat_template", None))
        text = prompt if isinstance(prompt, str) else (
            tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if templated
            else prompt_to_text(prompt)
        )
        ids = list(tok(text, add_special_tokens=not templated)["input_ids"])
        limit = self._context_len()
        if limit and len(ids) + len(cont) + 1 > limit:
            keep = max(1, limit - len(cont) - 1)
            if not self._warned_truncation:
                logger.warning(
                    "prompt of %d tokens + a %d-token answer exceeds the context (%d); keeping its last %d tokens",
                    len(ids), len(cont), limit, keep,
                )
                self._warned_truncation = True
            ids = ids[-keep:]
        if not ids:  # an empty prompt: condition on BOS (or EOS), like the hf backend
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise ValueError("cannot score after an empty prompt: the tokenizer has no bos or eos token")
            ids = [int(start)]
        return ids, cont

    def loglik(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """Per pair: ``(sum of log p(continuation token | prompt, earlier tokens), n tokens)``, teacher-forced.

        Each pair is sent as token ids (prompt + continuation) with ``SamplingParams(max_tokens=1, temperature=0,
        prompt_logprobs=1)``; ``RequestOutput.prompt_logprobs[i]`` holds ``log p(token i | tokens < i)`` (``None`` at
        position 0), and the continuation's positions are summed. vLLM batches all pairs of a call.

        Raises:
            LoglikUnsupported: vLLM returned no prompt logprobs (or none for a continuation token).
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        if not prompts:
            return []
        pairs = [self.encode_pair(p, c) for p, c in zip(prompts, continuations, strict=True)]
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        inputs = [{"prompt_token_ids": ids + cont} for ids, cont in pairs]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        if len(outputs) != len(pairs):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(pairs)} prompts")
        results: list[tuple[float, int]] = []
        for out, (ids, cont) in zip(outputs, pairs, strict=True):
            plp = getattr(out, "prompt_logprobs", None)
            if plp is None or len(plp) < len(ids) + len(cont):
                raise LoglikUnsupported(
                    f"vLLM ({self.path}) returned no prompt logprobs for a scoring request (prompt_logprobs=1); "
                    "scoring needs a vLLM version whose engine returns them"
                )
            total = 0.0
            for pos, token in enumerate(cont, start=len(ids)):
                entry = plp[pos]
                try:
                    total += float(entry[token].logprob)
                except (KeyError, TypeError, IndexError):
                    raise LoglikUnsupported(
                        f"vLLM ({self.path}) returned no log-probability for prompt token {token} at position {pos}"
                    ) from None
            results.append((total, len(cont)))
        return results

    def __repr__(self) -> str:
        return f"VLLMGenerator({self.path!r}, dtype={self.dtype!r})"
