"""Cheaper dropout for CPU training: the same Bernoulli(1-p) masks from fewer random bits.

On a CPU, dropout is a large share of a cross-encoder training step: ``torch.bernoulli_`` draws one random number per
element, and SDPA with ``dropout_p > 0`` leaves its fused kernel for the math path. On MiniLM (32 pairs of ~170
tokens, forwards of 4 rows) mask generation alone was 15% of the step in the profiler. :func:`keep_mask` draws one
64-bit random word per three elements and keeps an element when its 16-bit slice is at or above ``round(p * 2^16)``,
so each element is dropped independently with probability ``p`` to within 2^-17, and kept values are scaled by
the exact ``1 / (1 - p_used)``: the expectation of the output equals the input, as with
:func:`torch.nn.functional.dropout`. The random words come from torch's default generator, so
``torch.manual_seed`` (and the Trainer's saved RNG state on resume) make the masks reproducible.

:func:`fast_cpu_dropout` swaps a model's ``nn.Dropout`` modules for :class:`FastDropout` and its attention for
:func:`attention_forward` (registered as ``dpa_rag_cpu`` with transformers' ``AttentionInterface``: SDPA without
dropout, the eager formula with a :func:`keep_mask` mask in training) and restores both on exit. Neither is saved
with the model: ``save_pretrained`` writes the same files, and evaluation (no dropout) runs the model's own SDPA path.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["ATTENTION_NAME", "FastDropout", "attention_forward", "fast_cpu_dropout", "keep_mask"]

ATTENTION_NAME = "dpa_rag_cpu"
_SLICES = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)  # the three low 16-bit words of a 63-bit draw


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu"
) -> tuple[Tensor, float]:
    """A boolean keep-mask (each element kept with probability ``1 - p``) and the scale ``1 / (1 - p_used)``.

    ``p_used = round(p * 65536) / 65536``. ``Tensor.random_()`` fills int64 with uniform values in ``[0, 2^63)``; the
    three low 16-bit words of each are independent and uniform, the top one (15 bits) is not used.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1); got {p}")
    n = 1
    for s in shape:
        n *= int(s)
    threshold = round(p * 65536)
    words = torch.empty(-(-n // 3), dtype=torch.int64, device=device).random_()
    # the int16 view of a uniform 16-bit value is uniform over [-32768, 32767] (two's complement is a bijection), so
    # ">= threshold - 32768" holds with probability 1 - threshold / 65536
    halves = words.view(torch.int16).view(-1, 4)[:, _SLICES]
    keep = (halves >= threshold - 32768).reshape(-1)[:n].view(tuple(shape))
    return keep, 1.0 / (1.0 - threshold / 65536)


def _drop(x: Tensor, p: float) -> Tensor:
    keep, scale = keep_mask(x.shape, p, x.device)
    return torch.where(keep, x, 0.0).mul_(scale)  # autograd keeps the bool mask, not a float copy


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`keep_mask` masks on CPU tensors in training; ``F.dropout`` everywhere else."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Dropout's signature
        if not self.training or self.p == 0.0 or input.device.type != "cpu" or self.inplace:
            return super().forward(input)
        return _drop(input, self.p)


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Transformers attention function: SDPA when there is no dropout (or off CPU), else eager + :func:`keep_mask`.

    The eager branch is the formula of ``modeling_bert.eager_attention_forward`` (``softmax(qkᵀ·s + mask)``, dropout,
    ``@ v``) for bidirectional ``[batch, heads, seq, dim]`` inputs without grouped keys or a position bias; anything
    else (a causal module, whose mask SDPA builds itself) goes to SDPA.
    """
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", False)
    if (dropout == 0.0 or query.device.type != "cpu" or key.shape[1] != query.shape[1] or causal
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask[..., : key.shape[-2]]
    weights = _drop(torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype), dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


# encoder types whose self-attention goes through transformers' attention and mask interfaces (the swap is tested on
# BERT and RoBERTa); others keep their own attention and only get :class:`FastDropout` modules
_ATTENTION_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the padding mask SDPA would get


@contextlib.contextmanager
def fast_cpu_dropout(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``model`` trains with :class:`FastDropout` and :func:`attention_forward`; restored after.

    Only BERT-family encoders (``bert``, ``roberta``, ``xlm-roberta``, ``electra``) on SDPA or eager attention, with
    transformers >= 5 (whose attention and mask interfaces it plugs into), get the attention function; other models
    keep their own attention and only have their ``nn.Dropout`` swapped. Everything is restored on exit, also after
    an error, with each dropout module in the train/eval mode the model was left in.
    """
    if not enabled:
        yield model
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    attention = False
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Dropout:
                    setattr(parent, name, FastDropout(child.p, child.inplace).train(child.training))
                    swapped.append((parent, name, child))
        if (previous in ("sdpa", "eager") and getattr(config, "model_type", None) in _ATTENTION_TYPES
                and hasattr(model, "set_attn_implementation") and _transformers_major() >= 5):
            try:
                _register()
                model.set_attn_implementation(ATTENTION_NAME)
                attention = True
            except (ValueError, ImportError, AttributeError, TypeError, KeyError):
                attention = False
        yield model
    finally:
        for parent, name, child in swapped:
            current = getattr(parent, name)
            setattr(parent, name, child.train(current.training))  # the mode the model was left in
        if attention:
            model.set_attn_implementation(previous)
