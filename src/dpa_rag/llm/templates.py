"""Chat templates for base models that ship none, and the lookup of ``--chat-template`` values.

A value is resolved in this order: an existing ``.jinja``/``.j2`` (or any text) file; one of the names below; a
template shipped with TRL (``trl/chat_templates/<name>.jinja``, e.g. ``qwen2_5``, ``phi3``, ``gemma``).
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["CHAT_TEMPLATES", "apply_chat_template_option", "resolve_chat_template"]

logger = logging.getLogger(__name__)

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{{ bos_token }}{% for m in msgs %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_ALPACA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen": _CHATML,
    "llama2": _LLAMA2,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "alpaca": _ALPACA,
}


def _trl_template(name: str) -> str | None:
    try:
        import trl
    except ImportError:
        return None
    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def resolve_chat_template(value: str) -> str:
    """The Jinja text for a ``--chat-template`` value: a file, a name above, or a TRL-shipped template name.

    Raises:
        ValueError: the value is neither an existing file nor a known name.
    """
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    text = _trl_template(value)
    if text is not None:
        return text
    raise ValueError(
        f"unknown chat template '{value}': give a Jinja file or one of {', '.join(sorted(CHAT_TEMPLATES))} "
        "(or a template name shipped with TRL, e.g. qwen2_5, phi3, gemma)"
    )


def apply_chat_template_option(tokenizer, value: str | None, model_name: str) -> None:
    """Set ``tokenizer.chat_template`` from ``value``; without a value the model's own template must exist.

    Raises:
        ValueError: no value and the tokenizer has no chat template (a base model), or an unknown value.
    """
    if value:
        tokenizer.chat_template = resolve_chat_template(value)
        logger.info("chat template: %s", value)
        return
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of '{model_name}' has no chat template (a base model?): pass --chat-template with one of "
            f"{', '.join(sorted(CHAT_TEMPLATES))} or a Jinja file"
        )
