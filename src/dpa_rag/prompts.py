"""Reader prompt templates and answer clean-up, shared by the ``answer`` and ``mine`` stages.

A :class:`PromptTemplate` turns a question and its passages into a chat (``[{"role", "content"}, ...]``) or, for base
models without a chat template, into one plain string. Three templates are built in (:data:`BUILTIN_TEMPLATES`):

* ``qa`` (default): a system message asking for a short phrase, then ``"Passages: … Question: … Answer:"``.
  With SmolLM2 this layout gave 34% Hits@1 on NQ with the gold passage, against 21–22% for a plain prompt.
* ``dpa``: method.md §2 wording: the documents (``"Title: … Content: …"``), an instruction to answer briefly from the
  given information or the model's own knowledge without naming the source, then the question.
* ``plain``: passages, question, ``Answer:``; no instruction at all.

Your own template is a YAML file with the :class:`PromptTemplate` keys (see ``docs/answer_evaluate.md``); load either
with :func:`load_template`. Placeholders are replaced literally (``{question}``, ``{passages}`` in the templates;
``{i}``, ``{title}``, ``{text}``, ``{passage}`` in the passage format), so other braces in a template are kept as is.

Example:
    >>> t = load_template("qa")
    >>> chat = t.render("who wrote hamlet", ["Title: Hamlet Content: a tragedy by William Shakespeare"])
    >>> [m["role"] for m in chat]
    ['system', 'user']
    >>> clean_answer('Answer: "William Shakespeare."\\nQuestion: ...')
    'William Shakespeare'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from dpa_rag.config import ConfigError, load_yaml
from dpa_rag.data.loaders import parse_rendered_passage
from dpa_rag.data.schema import Ctx, Passage, format_passage

__all__ = ["BUILTIN_TEMPLATES", "DEFAULT_TEMPLATE", "PromptTemplate", "clean_answer", "load_template"]

DEFAULT_TEMPLATE = "qa"


def _fill(template: str, **values: str) -> str:
    """Replace ``{key}`` for the given keys only (other braces in the template stay untouched)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


class PromptTemplate(BaseModel):
    """A reader prompt: optional system message, open-book and closed-book user messages, passage layout.

    Attributes:
        name: label stored with the outputs.
        system: system message; empty = no system message.
        user: open-book user message; must contain ``{passages}`` and ``{question}``.
        closed_book_user: user message when there are no passages; must contain ``{question}``.
        passage_format: one passage; placeholders ``{i}`` (1-based rank), ``{title}``, ``{text}`` and ``{passage}``
            (the authors' ``"Title: <title> Content: <text>"``).
        untitled_format: used instead of ``passage_format`` for a passage without a title when ``passage_format``
            uses ``{title}``.
        passage_separator: text between passages.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    system: str = ""
    user: str
    closed_book_user: str = "Question: {question}\nAnswer:"
    passage_format: str = "[{i}] {title}: {text}"
    untitled_format: str = "[{i}] {text}"
    passage_separator: str = "\n"

    @field_validator("user")
    @classmethod
    def _check_user(cls, v: str) -> str:
        missing = [p for p in ("{passages}", "{question}") if p not in v]
        if missing:
            raise ValueError(f"must contain {' and '.join(missing)}")
        return v

    @field_validator("closed_book_user")
    @classmethod
    def _check_closed(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain {question}")
        return v

    @field_validator("passage_format", "untitled_format")
    @classmethod
    def _check_passage(cls, v: str) -> str:
        if "{text}" not in v and "{passage}" not in v:
            raise ValueError("must contain {text} or {passage}")
        return v

    def format_passages(self, passages: Sequence[Ctx | Passage | str]) -> str:
        """Render passages in rank order.

        Give ``Ctx``/``Passage`` objects (what every stage passes: their ``title`` and ``text`` are used as they
        are, stripped). A string is taken as a hand-written passage in the authors' ``"Title: … Content: …"``
        layout and split back into title and text (anything else is an untitled text).
        """
        parts = []
        for i, p in enumerate(passages, start=1):
            if isinstance(p, str):
                title, text = parse_rendered_passage(p)
            else:
                title, text = (p.title or "").strip(), p.text.strip()
            fmt = self.untitled_format if not title and "{title}" in self.passage_format else self.passage_format
            parts.append(_fill(fmt, i=str(i), title=title, text=text, passage=format_passage(title, text)))
        return self.passage_separator.join(parts)

    def user_message(self, question: str, passages: Sequence[Ctx | Passage | str] = ()) -> str:
        """The user message: open-book when there are passages, closed-book otherwise."""
        question = question.strip()
        if not passages:
            return _fill(self.closed_book_user, question=question)
        return _fill(self.user, passages=self.format_passages(passages), question=question)

    def render(self, question: str, passages: Sequence[Ctx | Passage | str] = ()) -> list[dict[str, str]]:
        """Chat messages for chat models (no system message when :attr:`system` is empty)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.user_message(question, passages)})
        return messages

    def render_text(self, question: str, passages: Sequence[Ctx | Passage | str] = ()) -> str:
        """One plain string for base models: the system message, a blank line, the user message."""
        user = self.user_message(question, passages)
        return f"{self.system}\n\n{user}" if self.system else user


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    "qa": PromptTemplate(
        name="qa",
        system=(
            "Answer the question with a short phrase (a few words), using the passages or your own knowledge. "
            "Do not explain."
        ),
        user="Passages:\n{passages}\n\nQuestion: {question}\nAnswer:",
        closed_book_user="Question: {question}\nAnswer:",
    ),
    "dpa": PromptTemplate(
        name="dpa",
        user=(
            "Given the following information:\n{passages}\n\n"
            "Answer the question briefly, with a short phrase, based on the given information or your own knowledge. "
            "Do not mention where the answer comes from.\nQuestion: {question}\nAnswer:"
        ),
        closed_book_user=(
            "Answer the question briefly, with a short phrase, based on your own knowledge. "
            "Do not explain.\nQuestion: {question}\nAnswer:"
        ),
        passage_format="[{i}] {passage}",
    ),
    "plain": PromptTemplate(
        name="plain",
        user="{passages}\n\nQuestion: {question}\nAnswer:",
        closed_book_user="Question: {question}\nAnswer:",
        passage_format="{passage}",
    ),
}


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """A built-in template by name (``qa``, ``dpa``, ``plain``) or one read from a YAML file.

    The YAML file holds :class:`PromptTemplate` keys; ``user`` is required, ``name`` defaults to the file's stem.

    Raises:
        ConfigError: unknown name, missing file, unknown or invalid key (the message names the key).
    """
    key = str(name_or_path)
    if key in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[key]
    path = Path(key)
    if path.suffix.lower() not in (".yaml", ".yml") or not path.exists():
        raise ConfigError(
            f"unknown prompt template '{key}': use a built-in name ({', '.join(BUILTIN_TEMPLATES)}) "
            "or the path of an existing .yaml file"
        )
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    try:
        return PromptTemplate.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(map(str, e["loc"])) or "(root)"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown key '{loc}' (known keys: {', '.join(PromptTemplate.model_fields)})")
            else:
                problems.append(f"'{loc}': {e['msg']}")
        raise ConfigError(f"{path}: invalid prompt template: " + "; ".join(problems)) from None


_PREFIX = re.compile(r"^\s*(?:\*\*)?(?:final answer|short answer|answer|a)\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?", re.I)
_QUOTES = "\"'`“”‘’«»"


def clean_answer(text: str) -> str:
    """Post-process a raw completion into a short answer.

    Takes the first non-empty line, drops ``Answer:``-style prefixes (also ``A:``, ``**Answer:**``), surrounding
    quotes and markdown bold, and one trailing period. Keep the raw output next to it: this never fixes content.
    """
    line = ""
    for candidate in text.strip().splitlines():
        candidate = candidate.strip()
        while True:
            stripped = _PREFIX.sub("", candidate, count=1).strip()
            if stripped == candidate:
                break
            candidate = stripped
        if candidate:
            line = candidate
            break
    line = line.strip("*").strip()
    line = _drop_period(line)
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = _drop_period(line[1:-1].strip())
    return line


def _drop_period(s: str) -> str:
    return s[:-1].rstrip() if s.endswith(".") and not s.endswith("..") else s


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")
_PIECES = re.compile(r"\w+|[^\w\s]")


def finished_line(text: str, max_new_tokens: int | None = None) -> str | None:
    """The first non-empty line of a raw completion if the reader finished it, else ``None``.

    A line is finished when it ends a sentence (``.``, ``!``, ``?`` or ``…``, then optional closing quotes or
    brackets), when the completion goes on to another line, or, given the token budget it was generated with, when
    it has fewer than half as many words and punctuation marks as the budget has tokens ("Paris" of 16: a completion
    the budget cut fills the budget, and a token rarely spans two of them). A completion cut by the budget ends
    mid-sentence ("The largest bill in American money is the $100 bill, which is"): training on it as a target (the
    end-of-turn token after it) would teach the reader to stop mid-sentence. Kept as written: no prefix, quote or
    period removed.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    first = lines[0]
    if len(lines) > 1 or _SENTENCE_END.search(first):
        return first
    if max_new_tokens is not None and 2 * len(_PIECES.findall(first)) < max_new_tokens:
        return first
    return None
