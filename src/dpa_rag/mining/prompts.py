"""The reader prompts of preference mining and of the LLM training sets (method.md §2, §7).

* :func:`qa_prompt` — the §2 QA prompt: the passages (if any), an instruction to answer briefly from the given
  information or the model's own knowledge without naming the source, then the question. Closed-book = no passages.
* :func:`judge_prompt` / :func:`judge_target` — the pre-aligned task (method.md §7): the same passages and question,
  then a judgement slot asking whether passage *i* is Positive or Negative knowledge for the question, under its
  own system prompt (:data:`JUDGE_SYSTEM`), so the judgement task does not answer the QA system prompt.

The QA prompt and answer clean-up are :mod:`dpa_rag.prompts`' (one prompt for mining, training and answering).
Passages are given as objects (:class:`~dpa_rag.data.schema.Ctx` or :class:`~dpa_rag.data.schema.Passage`); a string
is read as an already rendered ``"Title: … Content: …"`` passage.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpa_rag.data.schema import Ctx, Passage
from dpa_rag.prompts import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE, clean_answer, load_template

__all__ = [
    "JUDGE_INSTRUCTION",
    "JUDGE_SYSTEM",
    "QA_SYSTEM",
    "clean_answer",
    "judge_prompt",
    "judge_target",
    "qa_prompt",
    "qa_user_message",
]

QA_SYSTEM = BUILTIN_TEMPLATES[DEFAULT_TEMPLATE].system

JUDGE_SYSTEM = (
    "Judge whether a passage is useful for answering the question: Positive if it helps you answer correctly, "
    "Negative if it misleads you."
)

JUDGE_INSTRUCTION = (
    "Is passage [{i}] positive knowledge (it helps you answer the question correctly) or negative knowledge "
    "(it misleads you) for this question? Answer with Positive or Negative."
)


def qa_user_message(
    question: str, passages: Sequence[Ctx | Passage | str], template: str = DEFAULT_TEMPLATE
) -> str:
    """The user turn of the reader's QA prompt (closed-book when ``passages`` is empty)."""
    return load_template(template).user_message(question, list(passages))


def qa_prompt(
    question: str, passages: Sequence[Ctx | Passage | str], template: str = DEFAULT_TEMPLATE
) -> list[dict[str, str]]:
    """Chat messages asking the reader to answer ``question`` from ``passages`` (closed-book when empty).

    The same template as ``dpa-rag answer`` (:mod:`dpa_rag.prompts`), so preferences are mined, the reader is
    trained and it is evaluated with one prompt.

    Args:
        question: the question text.
        passages: the passages (``Ctx``/``Passage``, or rendered ``"Title: … Content: …"`` strings), most relevant
            first; may be empty.
        template: a built-in template name or a YAML file (see :func:`dpa_rag.prompts.load_template`).
    """
    return load_template(template).render(question, list(passages))


def _rendered(p: Ctx | Passage | str) -> str:
    return p.strip() if isinstance(p, str) else p.render()


def judge_prompt(question: str, passages: Sequence[Ctx | Passage | str], index: int) -> list[dict[str, str]]:
    """Chat messages of the pre-aligned task: judge whether passage ``index`` (1-based) is positive or negative.

    Passages are always numbered here, so ``[index]`` refers to one of them; each is shown as the authors render it
    (``"Title: … Content: …"``).
    """
    if not 1 <= index <= len(passages):
        raise ValueError(f"passage index {index} is outside 1..{len(passages)}")
    block = "Passages:\n" + "\n".join(f"[{i}] {_rendered(p)}" for i, p in enumerate(passages, start=1))
    user = f"{block}\n\nQuestion: {question.strip()}\n\n{JUDGE_INSTRUCTION.format(i=index)}"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judge_target(index: int, positive: bool) -> str:
    """The pre-aligned target: ``"Passage [i] is Positive knowledge for the question."`` (or Negative)."""
    return f"Passage [{index}] is {'Positive' if positive else 'Negative'} knowledge for the question."
