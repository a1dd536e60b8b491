"""Turn a chatty model output into one clean rewrite, or a recorded failure.

Instruct models wrap the rewrite in chatter: ``Sure! Here is the rewritten question: "…"``, markdown, numbered lists,
``Rewritten question:`` labels, code fences, trailing explanations. :func:`parse_rewrite` strips all of that and
keeps the rewrite; it never invents one. An output that is empty, a refusal, an echo of the original or (for SPARQL)
has no query is a failure with a reason:

* ``empty`` — nothing left after cleaning;
* ``refusal`` — "I'm sorry, I can't …", "As an AI …";
* ``echo`` — the original question again (compared case-, punctuation- and article-insensitively);
* ``prompt_echo`` — the model repeated the instruction ("Reply with only the rewritten question");
* ``not_question`` — no question in it: an answer ("The answer is …", or "The Eagles won in 2018." for a question
  that starts "when …"), an exclamation, chatter. A rewrite must look like a question (a question mark, a question
  word first, an ask such as "Name the …") when its original does; for NQ's "… of which country" style a question
  word anywhere is enough; keyword-style originals ("statue coming out of the ground in washington dc", 8% of
  NQ-open dev) only lose answers and exclamations;
* ``no_query`` — SPARQL mode, but no ``SELECT``/``ASK``/``CONSTRUCT``/``DESCRIBE`` query with a ``{ … }`` body;
* ``truncated`` — SPARQL mode, the query's braces never close (the model ran out of tokens).

Modes (see :func:`dpa_rag.augment.strategies.parse_mode`): ``single`` keeps the first question-like line, ``multi``
(decomposition) keeps every sub-question and joins them with spaces, ``sparql`` keeps the query text (lines kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FAILURE_REASONS", "ParsedRewrite", "is_echo", "looks_like_question", "normalize_question", "parse_rewrite"]

FAILURE_REASONS = ("empty", "refusal", "echo", "prompt_echo", "not_question", "no_query", "truncated")

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S | re.I)
_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_REFUSAL = re.compile(
    r"^\W*(?:i'?m\s+sorry|i\s+am\s+sorry|sorry\b|apologies|i\s+apologi[sz]e|as\s+an\s+ai\b|unfortunately,?\s+i\b|"
    r"i\s*(?:'m|\s+am)\s+(?:unable|not\s+able)|i\s+(?:can\s*not|can'?t|cannot|won'?t|will\s+not|am\s+unable)\b)",
    re.I,
)
_CHEER = r"(?:sure(?:\s+thing)?|certainly|of\s+course|okay|ok|absolutely|alright|great|got\s+it)"
_INLINE_PREAMBLE = re.compile(
    rf"^(?:{_CHEER}\s*[!.,:]*\s*)?(?:here(?:'s|\s+is|\s+are)\b[^:?\n]*?:|below\s+is\b[^:?\n]*?:)\s*", re.I
)
_LEADING_CHEER = re.compile(rf"^{_CHEER}\s*[!.,]+\s*", re.I)
_LABEL_WORDS = (
    r"(?:the\s+)?(?:(?:rewritten|rephrased|paraphrased|reworded|revised|modified|new|complex|more\s+complex|harder|"
    r"constrained|final|updated|improved|decomposed)\s+)?(?:question|query|version|sub-?questions?|rewrite|output|"
    r"result|sparql(?:\s+query)?|step)"
)
_LABEL = re.compile(rf"^{_LABEL_WORDS}\s*\d*\s*[:：]\s*", re.I)
_SHORT_LABEL = re.compile(r"^(?:q|sq|step|sub-?q)\s*\d+\s*[:.)]\s*", re.I)
_ORIGINAL = re.compile(r"^(?:the\s+)?original(?:\s+question)?\s*[:：\-]", re.I)
_BULLET = re.compile(r"^(?:[-*•·–—+]\s+|\(?\d{1,2}\s*[.):]\s*|\(?[a-hA-H]\)\s+|[a-hA-H]\.\s+(?=[A-Z]))")
_EXPLANATION = re.compile(
    r"^\(?(?:explanation|note|notes|reasoning|rationale|justification|answer)\b|"
    r"^\(?(?:this|the\s+(?:above|new|rewritten|revised))\s+(?:question|version|rewrite|rewritten|query|sub-?questions?|"
    r"adds|keeps|asks|requires|is|makes|introduces|breaks)\b|"
    r"^\(?(?:i\s+(?:have|added|rewrote|changed|made|kept|replaced|used)|in\s+this\s+(?:version|rewrite)|by\s+adding)\b",
    re.I,
)
_QUOTES = {'"': '"', "“": "”", "«": "»", "'": "'", "‘": "’", "`": "`", "„": "“", "”": "”"}
_SPARQL_START = re.compile(r"\b(?:PREFIX|BASE|SELECT|ASK|CONSTRUCT|DESCRIBE)\b", re.I)
_SPARQL_TAIL = re.compile(
    r"(?:\s*(?:(?:GROUP|ORDER)\s+BY(?:\s+(?:(?:ASC|DESC)\s*)?\(?\s*\?\w+\s*\)?)+|HAVING\s*\([^)\n]*\)|"
    r"(?:LIMIT|OFFSET)\s+\d+))+",
    re.I,
)
_QWORD = re.compile(
    r"^(?:who|whom|whose|what|when|where|which|why|how|is|are|was|were|do|does|did|can|could|has|have)\b", re.I
)
_ASKING = re.compile(
    r"^(?:name|list|identify|find|give|tell|state|determine|describe|explain|provide|specify|according\s+to)\b|"
    r"^(?:in|on|at|from|to|for|by|during|of|with|under|after|before|since|until)\s+(?:which|what|whom|whose|how)\b",
    re.I,
)
_PROMPT_ECHO = re.compile(
    r"\b(?:reply\s+with\s+only|rewritten\s+question|original\s+question|rewrite\s+the\s+question|"
    r"the\s+question\s+below|sub-questions\s+that)\b",
    re.I,
)
_WH_ANY = re.compile(r"\b(?:which|what|who|whom|whose|when|where|how)\b", re.I)
_CHATTER = re.compile(r"^(?:yes|no|i|i'm|i've|i'll|my|the\s+answer|answer|it|this|that|here)\b", re.I)
_ANSWERISH = re.compile(r"^(?:the\s+)?answer\b|.*!$", re.I)
_SHORT_PREFIX = re.compile(r"^([^:?\n]{1,60}?)\s*[:：]\s+(\S.*)$")


@dataclass(frozen=True)
class ParsedRewrite:
    """The outcome of parsing one model output: ``text`` (the rewrite) or ``failure`` (a reason), never both."""

    text: str | None
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.text is not None


def normalize_question(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (for echo and dedup checks)."""
    s = re.sub(r"[^\w\s]", " ", s.lower())
    s = re.sub(r"\b(?:a|an|the)\b", " ", s)
    return " ".join(s.split())


def is_echo(rewrite: str, original: str) -> bool:
    """Whether ``rewrite`` is the original question again (up to case, punctuation and articles)."""
    return normalize_question(rewrite) == normalize_question(original)


def _strip_markdown(line: str) -> str:
    line = re.sub(r"^#{1,6}\s*", "", line)
    line = re.sub(r"^>\s*", "", line)
    line = line.replace("**", "").replace("__", "")
    line = re.sub(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])", r"\1", line)
    return line.strip()


def _strip_quotes(line: str) -> str:
    """Unwrap a quoted rewrite.

    ``"Who wrote X?"`` and ``"Who wrote X?" This version …`` give the quoted question; ``"Hey Jude" was written by
    whom?`` is kept whole (the quote is part of the question); an unmatched quote at either end is dropped.
    """
    if len(line) >= 2 and line[0] in _QUOTES:
        close = line.find(_QUOTES[line[0]], 1)
        if close > 1:
            inside, rest = line[1:close].strip(), line[close + 1 :].strip()
            if not normalize_question(rest) or inside.endswith("?"):
                return inside
            return line
        line = line[1:].strip()
    if line and line[-1] in "\"”»`’" and not any(c in line[:-1] for c in "\"“«`‘"):
        line = line[:-1].strip()
    return line


def looks_like_question(text: str) -> bool:
    """A question mark, a question word first ("who", "in which"…) or an imperative ask ("Name the…"); not "…!"."""
    text = text.strip()
    if not text or text.endswith("!"):
        return False
    return "?" in text or bool(_QWORD.match(text) or _ASKING.match(text))


def _questionish(text: str) -> bool:
    """:func:`looks_like_question`, or a question word anywhere (NQ style) in text that is not chatter."""
    text = text.strip()
    if looks_like_question(text):
        return True
    return bool(text) and not text.endswith("!") and bool(_WH_ANY.search(text)) and not _CHATTER.match(text)


def _strip_short_prefix(line: str) -> str:
    """``Asked: What is X?`` / ``Rewrite the question to: Who …?`` → the question after the colon."""
    m = _SHORT_PREFIX.match(line)
    if m and len(m.group(1).split()) <= 6 and looks_like_question(m.group(2)):
        return m.group(2).strip()
    return line


def _clean_line(line: str) -> str:
    prev = None
    while prev != line:
        prev = line
        line = _strip_markdown(line)
        line = _strip_short_prefix(line)
        line = _INLINE_PREAMBLE.sub("", line)
        line = _LEADING_CHEER.sub("", line)
        line = _BULLET.sub("", line)
        line = _LABEL.sub("", line)
        line = _SHORT_LABEL.sub("", line)
        line = line.strip().strip("`").strip()
        line = _strip_quotes(line)
    return line


def _is_preamble(cleaned: str, raw: str) -> bool:
    raw_plain = _strip_markdown(raw).rstrip()
    if not cleaned:
        return True
    if "?" not in raw_plain and (raw_plain.endswith((":", "：")) or raw.lstrip().startswith("#")):
        return True
    if re.fullmatch(rf"{_LABEL_WORDS}s?", cleaned, re.I):
        return True
    return bool(re.fullmatch(rf"{_CHEER}\s*[!.,]*", cleaned, re.I))


def _cut_after_question(line: str) -> str:
    """Drop a trailing explanation after the last question mark ("What is X? This adds …" → "What is X?")."""
    idx = line.rfind("?")
    return line[: idx + 1] if idx >= 0 else line


def _terminate(piece: str) -> str:
    if piece[-1:] in ".?!;":
        return piece
    return piece + ("?" if _QWORD.match(piece) else ".")


def _candidate_lines(text: str) -> list[str]:
    out: list[str] = []
    for raw in text.split("\n"):
        if not raw.strip():
            continue
        if _ORIGINAL.match(_strip_markdown(raw)):
            continue
        cleaned = _clean_line(raw)
        if out and _EXPLANATION.match(cleaned):
            break
        if _is_preamble(cleaned, raw) or _EXPLANATION.match(cleaned):
            continue
        out.append(cleaned)
    return out


def _parse_sparql(text: str) -> ParsedRewrite:
    for m in _SPARQL_START.finditer(text):
        keyword = m.group(0)
        line_start = text.rfind("\n", 0, m.start()) + 1
        at_line_start = not text[line_start : m.start()].strip()
        if not (keyword.isupper() or at_line_start):
            continue
        brace = text.find("{", m.end())
        if brace < 0 or "\n\n" in text[m.end() : brace] or ";" in text[m.end() : brace]:
            continue
        depth, end = 0, -1
        for i in range(brace, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
        if end < 0:
            return ParsedRewrite(None, "truncated")
        tail = _SPARQL_TAIL.match(text, end)
        query = text[m.start() : tail.end() if tail else end]
        lines = [ln.strip() for ln in query.split("\n") if ln.strip()]
        return ParsedRewrite("\n".join(lines))
    return ParsedRewrite(None, "no_query")


def parse_rewrite(raw: str, original: str, mode: str = "single") -> ParsedRewrite:
    """Extract the rewrite from a model output.

    Args:
        raw: the model's completion.
        original: the original question (to detect echoes).
        mode: ``single`` (one question), ``multi`` (sub-questions, joined with spaces) or ``sparql`` (a query).

    Returns:
        A :class:`ParsedRewrite` with the rewrite, or with a failure reason from :data:`FAILURE_REASONS`.
    """
    if mode not in ("single", "multi", "sparql"):
        raise ValueError(f"unknown parse mode '{mode}' (expected single, multi or sparql)")
    text = _THINK.sub("", (raw or "").replace("\r\n", "\n")).strip()
    if not text:
        return ParsedRewrite(None, "empty")
    if _REFUSAL.match(_LEADING_CHEER.sub("", _strip_markdown(text))):
        return ParsedRewrite(None, "refusal")
    fence = _FENCE.search(text)
    if fence and fence.group(1).strip():
        text = fence.group(1).strip()
    if mode == "sparql":
        return _parse_sparql(text)
    lines = [_cut_after_question(ln) for ln in _candidate_lines(text)]
    lines = [ln for ln in lines if normalize_question(ln)]
    if not lines:
        return ParsedRewrite(None, "empty")
    if _REFUSAL.match(lines[0]):
        return ParsedRewrite(None, "refusal")
    fresh = [ln for ln in lines if not is_echo(ln, original)]
    if not fresh:
        return ParsedRewrite(None, "echo")
    questions = [ln for ln in fresh if not _PROMPT_ECHO.search(ln) and not _ANSWERISH.match(ln)]
    if looks_like_question(original):
        questions = [ln for ln in questions if looks_like_question(ln)]
    elif _questionish(original):  # NQ style "field hockey is the national sport of which country"
        questions = [ln for ln in questions if _questionish(ln)]
    if not questions:
        return ParsedRewrite(None, "prompt_echo" if any(_PROMPT_ECHO.search(ln) for ln in fresh) else "not_question")
    if mode == "single":
        return ParsedRewrite(questions[0])
    return ParsedRewrite(" ".join(_terminate(p) for p in questions))
