"""Rewrite strategies and their prompt templates.

The five strategies of DPA-RAG (method.md §4) each have a bundled template in ``dpa_rag/augment/prompts/<name>.txt``.
A template is plain text with one ``{question}`` placeholder (filled by plain substitution, so braces elsewhere, e.g.
in a SPARQL example, need no escaping). A user folder (``prompt_dir``) overrides any bundled template file by file
and can add new strategies: a strategy is any name with a ``<name>.txt`` template in ``prompt_dir`` or the bundle.

Each strategy has a parse mode: ``sparql`` keeps a query, ``decomposition`` keeps several sub-questions, everything
else keeps one question.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Literal

from dpa_rag.generation.base import Prompt

__all__ = [
    "DEFAULT_STRATEGIES",
    "PLACEHOLDER",
    "ParseMode",
    "available_strategies",
    "load_templates",
    "parse_mode",
    "render_prompt",
]

logger = logging.getLogger(__name__)

DEFAULT_STRATEGIES: tuple[str, ...] = ("rephrasing", "complexity", "decomposition", "constraint", "sparql")
PLACEHOLDER = "{question}"

ParseMode = Literal["single", "multi", "sparql"]
_MODES: dict[str, ParseMode] = {"decomposition": "multi", "sparql": "sparql"}


def parse_mode(strategy: str) -> ParseMode:
    """How the output of ``strategy`` is parsed: ``sparql``, ``multi`` (decomposition) or ``single``."""
    return _MODES.get(strategy, "single")


def _bundled_dir() -> Path:
    return Path(str(resources.files("dpa_rag.augment") / "prompts"))


def available_strategies(prompt_dir: str | Path | None = None) -> list[str]:
    """Names of all strategies with a template, bundled or in ``prompt_dir``, sorted."""
    names = {p.stem for p in _bundled_dir().glob("*.txt")}
    if prompt_dir is not None and Path(prompt_dir).is_dir():
        names |= {p.stem for p in Path(prompt_dir).glob("*.txt")}
    return sorted(names)


def load_templates(strategies: list[str] | tuple[str, ...], prompt_dir: str | Path | None = None) -> dict[str, str]:
    """The template of each strategy: ``prompt_dir/<name>.txt`` if it exists, else the bundled one.

    Raises:
        FileNotFoundError: ``prompt_dir`` is given but is not a folder.
        ValueError: a strategy has no template, a template lacks ``{question}``, or a strategy is listed twice.
    """
    if not strategies:
        raise ValueError("no rewrite strategy given")
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"a strategy is listed twice: {list(strategies)}")
    user = Path(prompt_dir) if prompt_dir is not None else None
    if user is not None and not user.is_dir():
        raise FileNotFoundError(f"{user}: prompt_dir is not a folder")
    bundled = _bundled_dir()
    out: dict[str, str] = {}
    for name in strategies:
        candidates = ([user / f"{name}.txt"] if user is not None else []) + [bundled / f"{name}.txt"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            known = ", ".join(available_strategies(user))
            raise ValueError(
                f"no prompt template for strategy '{name}' (available: {known}; add {name}.txt to prompt_dir)"
            )
        text = path.read_text(encoding="utf-8").strip()
        if PLACEHOLDER not in text:
            raise ValueError(f"{path}: the template has no {PLACEHOLDER} placeholder")
        logger.debug("strategy %s: template %s", name, path)
        out[name] = text
    return out


def render_prompt(template: str, question: str) -> Prompt:
    """A one-message chat asking for the rewrite of ``question``."""
    return [{"role": "user", "content": template.replace(PLACEHOLDER, question.strip())}]
