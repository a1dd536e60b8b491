"""Local generation with 🤗 transformers: one model loaded once, batched left-padded decoding, greedy by default."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpa_rag.generation.base import GenerationParams, Prompt, prompt_to_text
from dpa_rag.models import attn_kwargs, fingerprint, pick_device, pick_dtype, resolve_llm

__all__ = ["HFGenerator", "truncate_at_stop"]

logger = logging.getLogger(__name__)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` cut at the earliest occurrence of any stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class HFGenerator:
    """A causal LM from transformers behind the :class:`~dpa_rag.generation.base.Generator` protocol.

    The tokenizer and model are loaded once (``model.eval()``, the picked dtype and device). Chats go through the
    tokenizer's chat template with ``add_generation_prompt=True`` (rendered as plain text when the tokenizer has none);
    plain strings are used as is. Prompts are sorted by length and split into left-padded batches of ``batch_size``;
    outputs come back in the input order. Decoding is greedy when ``params.temperature == 0`` (deterministic) and
    sampled with ``params.seed`` otherwise. Only the new tokens are decoded (special tokens skipped), cut at the first
    stop string and stripped.

    Args:
        model: a bundled alias (``smollm2-135m``), a hub id or a local folder.
        dtype: ``auto`` | ``bfloat16`` | ``float16`` | ``float32`` (see :func:`dpa_rag.models.pick_dtype`).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:1`` | ``mps``.
        batch_size: prompts per forward batch inside one :meth:`generate` call.
        num_threads: if given, ``torch.set_num_threads(num_threads)``; by default torch's setting is left alone.
        cache_dir: where bundled aliases are converted (default: the dpa-rag cache folder).
        trust_remote_code: passed to ``from_pretrained``.
        attn_implementation: ``auto`` (transformers chooses), ``sdpa``, ``eager`` or ``flash_attention_2`` (needs
            the ``flash-attn`` package; see :func:`dpa_rag.models.attn_kwargs`).

    Attributes:
        model_id: weights fingerprint, dtype (it changes outputs) and a hash of the chat template; part of the cache
            key.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 16,
        num_threads: int | None = None,
        cache_dir: str | Path | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        attn = attn_kwargs(attn_implementation)  # fails before anything loads
        self.path = resolve_llm(model, cache_dir)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        tok.padding_side = "left"
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"tokenizer of {model} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        logger.info("loading %s on %s (%s)", self.path, self.device, str(self.dtype).removeprefix("torch."))
        lm = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype, trust_remote_code=trust_remote_code,
                                                  **attn)
        self.model = lm.to(self.device).eval()
        self.model_id = f"{fingerprint(self.path)}:{str(self.dtype).removeprefix('torch.')}"
        if attn:  # another kernel can change a greedy answer in the last bits; auto keeps the ids of older caches
            self.model_id += f":attn-{attn['attn_implementation']}"
        template = getattr(tok, "chat_template", None)
        if isinstance(template, str):  # the template shapes every chat prompt; the weights fingerprint misses it
            self.model_id += ":chat-" + hashlib.sha1(template.encode("utf-8")).hexdigest()[:8]
        self._eos_ids = self._collect_eos_ids()
        self._setup_forward()

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, batch_size: int = 16, model_id: str = "in-memory") -> HFGenerator:
        """A generator over an already loaded ``model`` and ``tokenizer`` (e.g. a model being trained), decoding
        exactly as a loaded one does; the model is used as it is (put it in eval mode first)."""
        self = cls.__new__(cls)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.path, self.tokenizer, self.model, self.model_id = "in-memory", tokenizer, model, model_id
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        self.batch_size = batch_size
        self._eos_ids = self._collect_eos_ids()
        self._setup_forward()
        return self

    def _setup_forward(self) -> None:
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._warned_truncation = False

    def _collect_eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        return ids

    def render(self, prompt: Prompt) -> str:
        """The text the model sees for ``prompt`` (chat template applied to chats)."""
        if isinstance(prompt, str):
            return prompt
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return prompt_to_text(prompt)

    def encode(self, prompt: Prompt, max_new_tokens: int = 0) -> list[int]:
        """Token ids of the rendered prompt (left-truncated, with a warning, if it would not fit the context)."""
        templated = not isinstance(prompt, str) and bool(getattr(self.tokenizer, "chat_template", None))
        # a chat template already writes its special tokens (e.g. BOS); don't add them twice
        ids = self.tokenizer(self.render(prompt), add_special_tokens=not templated)["input_ids"]
        if self._max_positions and len(ids) + max_new_tokens > self._max_positions:
            keep = max(1, self._max_positions - max_new_tokens)
            if not self._warned_truncation:
                logger.warning(
                    "prompt of %d tokens + %d new tokens exceeds the context (%d); keeping its last %d tokens",
                    len(ids), max_new_tokens, self._max_positions, keep,
                )
                self._warned_truncation = True
            ids = ids[-keep:]
        if not ids:  # an empty prompt: start from BOS (or EOS) so there is something to condition on
            start = self.tokenizer.bos_token_id
            if start is None:
                start = self._eos_ids[0] if self._eos_ids else self.tokenizer.pad_token_id
            ids = [start]
        return list(ids)

    def _generation_config(self, params: GenerationParams) -> Any:
        from transformers import GenerationConfig

        kw: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": not params.greedy,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self._eos_ids or None,
            "num_beams": 1,
        }
        if params.stop:
            # stop early once every row has produced a stop string; the text is cut in any case
            kw["stop_strings"] = list(params.stop)
        if params.greedy:
            kw.update(temperature=1.0, top_p=1.0, top_k=50)  # neutral values: no "unused sampling flag" warnings
        else:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        return GenerationConfig(**kw)

    def _generate_batch(self, batch: list[list[int]], params: GenerationParams) -> list[str]:
        import torch

        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
        extra: dict[str, Any] = {"tokenizer": self.tokenizer} if params.stop else {}
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=self._generation_config(params), **extra
        )
        new_tokens = out[:, width:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, params.stop).strip() for t in texts]

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        """One completion per prompt, in order (see the class docstring for the decoding rules)."""
        import torch

        if not prompts:
            return []
        encoded = [self.encode(p, params.max_new_tokens) for p in prompts]
        # longest first: similar lengths share a batch (less padding), and an out-of-memory error shows up at once
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[str] = [""] * len(prompts)
        devices = None if self.device.startswith("cuda") else []  # None: fork every visible CUDA generator
        with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=not params.greedy):
            if not params.greedy:
                torch.manual_seed(params.seed)
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for i, text in zip(idx, self._generate_batch([encoded[i] for i in idx], params), strict=True):
                    results[i] = text
        return results

    def encode_pair(self, prompt: Prompt, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the rendered prompt and of ``continuation`` as its answer (no special tokens added to it).

        The continuation is tokenised on its own, so its tokens are exactly what the reader would have to produce
        after the prompt; the pair is left-truncated like :meth:`encode` if it would not fit the context.
        """
        cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not cont:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        return self.encode(prompt, max_new_tokens=len(cont)), cont

    def loglik(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """Per pair: ``(sum of log p(continuation token | prompt, earlier tokens), n tokens)``, teacher-forced.

        Pairs that share a prompt (a question's gold answers after the same passage) share its forward: each batch
        of ``batch_size`` distinct prompts (length-sorted, left-padded, positions from the attention mask) runs once
        with the KV cache on and only its last position's logits; the cache is then gathered per continuation and
        the continuations' tokens run as one short second forward. fp32 log-softmax.
        """
        import torch

        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        if not prompts:
            return []
        pairs = [self.encode_pair(p, c) for p, c in zip(prompts, continuations, strict=True)]
        unique: dict[tuple[int, ...], list[int]] = {}
        for i, (ids, _) in enumerate(pairs):
            unique.setdefault(tuple(ids), []).append(i)
        keys = sorted(unique, key=lambda k: -len(k))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for start in range(0, len(keys), self.batch_size):
                batch = keys[start : start + self.batch_size]
                width = max(len(k) for k in batch)
                ids = torch.tensor([[pad] * (width - len(k)) + list(k) for k in batch], device=self.device)
                mask = torch.tensor([[0] * (width - len(k)) + [1] * len(k) for k in batch], device=self.device)
                first = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                   use_cache=True, logits_to_keep=1)
                first_logp = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # predicts token 1
                rows = [(b, i) for b, k in enumerate(batch) for i in unique[k]]
                conts = [pairs[i][1] for _, i in rows]
                longest = max(len(c) for c in conts)
                sums = [float(first_logp[b, pairs[i][1][0]]) for b, i in rows]
                if longest > 1:  # tokens 2..n: one forward over tokens 1..n-1 on the gathered prompt caches
                    sel = torch.tensor([b for b, _ in rows], device=self.device)
                    cache = getattr(first, "cache", None) or first.past_key_values  # transformers >= 5.2x: `cache`
                    cache.batch_select_indices(sel)
                    step = longest - 1
                    tail = torch.tensor([c[:-1] + [pad] * (step - len(c) + 1) for c in conts], device=self.device)
                    tail_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (step - len(c) + 1) for c in conts],
                                             device=self.device)
                    lengths = mask.sum(-1)[sel]
                    positions = lengths.unsqueeze(-1) + torch.arange(step, device=self.device).unsqueeze(0)
                    second = self.model(input_ids=tail, attention_mask=torch.cat([mask[sel], tail_mask], dim=-1),
                                        position_ids=positions, use_cache=True, **{self._cache_kwarg: cache})
                    logp = torch.log_softmax(second.logits.float(), dim=-1)
                    for r, c in enumerate(conts):
                        if len(c) > 1:
                            targets = torch.tensor(c[1:], device=self.device)
                            sums[r] += float(logp[r, : len(c) - 1].gather(-1, targets.unsqueeze(-1)).sum())
                for (_, i), total in zip(rows, sums, strict=True):
                    out[i] = (total, len(pairs[i][1]))
        return out

    def __repr__(self) -> str:
        return f"HFGenerator({self.path!r}, dtype={self.dtype}, device={self.device!r}, batch_size={self.batch_size})"
