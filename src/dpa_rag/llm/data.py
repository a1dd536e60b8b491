"""Training data for the reader: load, validate and convert to TRL's conversational prompt-completion format.

Accepted inputs (``.jsonl``, ``.json``, gzipped or not):

* chat messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}``, the last message
  is the assistant target (what ``dpa-rag build-llm-data`` writes as ``prealign.jsonl`` / ``sft.jsonl``);
* alpaca (LLaMA-Factory): ``{"instruction", "input", "output", "system", "history"}``; the user turn is
  ``instruction + "\\n\\n" + input`` (just ``instruction`` when ``input`` is empty);
* plain text: ``{"prompt": "…", "completion": "…"}`` strings (``build-llm-data --no-chat``: a reader answered
  without a chat template is trained on the same plain prompts; TRL appends EOS to the completion).

Each record becomes ``{"prompt": [messages…without the last], "completion": [last assistant message]}``, so the
loss covers the answer tokens only (``completion_only_loss``). A malformed record raises :class:`DataError` naming
``file:line``; empty answers and sequences longer than the cutoff are counted, warned about with their first
positions, and dropped (or, for over-length, truncated or refused; see :func:`check_lengths`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpa_rag.io import DataError, read_records

__all__ = [
    "DataReport",
    "LLMExample",
    "LengthBuckets",
    "check_lengths",
    "find_data_file",
    "load_examples",
    "record_to_messages",
]

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_POSITIONS = 5


@dataclass
class LLMExample:
    """One training example: the prompt turns, the assistant answer, and where it came from (``file:line``); a
    plain-text example (``{"prompt", "completion"}`` strings, for readers answered without a chat template) holds
    strings instead of messages."""

    prompt: list[dict[str, str]] | str
    completion: list[dict[str, str]] | str
    position: str

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)

    @property
    def answer(self) -> str:
        return self.completion if isinstance(self.completion, str) else self.completion[-1]["content"]

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass
class DataReport:
    """Counts of what was read, dropped and truncated, with the first few positions of each problem."""

    files: list[str] = field(default_factory=list)
    records: int = 0
    kept: int = 0
    empty_answers: int = 0
    overlength: int = 0
    overlength_dropped: int = 0
    truncated: int = 0
    max_length: int | None = None
    on_overlength: str = "drop"
    longest_tokens: int = 0
    positions: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, position: str) -> None:
        bucket = self.positions.setdefault(kind, [])
        if len(bucket) < MAX_POSITIONS:
            bucket.append(position)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_data_file(path: str | Path, stage: str) -> Path:
    """A data file, or ``<dir>/<stage>.jsonl`` / ``<dir>/<stage>.json`` inside a ``build-llm-data`` folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (f"{stage}.jsonl", f"{stage}.json", f"{stage}.jsonl.gz", f"{stage}.json.gz"):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"{path}: no {stage}.jsonl or {stage}.json in this folder")


def _where(path: Path, pos: int) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return f"{path}:{pos}" if not name.endswith(".json") else f"{path}: item {pos}"


def _text(rec: dict[str, Any], key: str, where: str, required: bool) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def record_to_messages(rec: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Validate one record (chat messages or alpaca) and return its messages, the last one the assistant target.

    Raises:
        DataError: a missing or mistyped field, an unknown role, or a last message that is not the assistant's;
            the message starts with ``where`` (``file:line``).
    """
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{i}] must be an object")
            role = _text(m, "role", f"{where}: messages[{i}]", required=True)
            if role not in ROLES:
                raise DataError(f"{where}: messages[{i}]: unknown role '{role}' (expected one of {', '.join(ROLES)})")
            out.append({"role": role, "content": _text(m, "content", f"{where}: messages[{i}]", required=True)})
        if out[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer, got role '{out[-1]['role']}'")
        if len(out) < 2 or not any(m["role"] == "user" for m in out[:-1]):
            raise DataError(f"{where}: no user message before the assistant's answer")
        return out
    if "instruction" in rec or "output" in rec:
        instruction = _text(rec, "instruction", where, required=True)
        output = _text(rec, "output", where, required=True)
        extra = _text(rec, "input", where, required=False)
        system = _text(rec, "system", where, required=False)
        out = [{"role": "system", "content": system}] if system else []
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise DataError(f"{where}: 'history' must be a list of [question, answer] pairs")
        for i, turn in enumerate(history):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"{where}: history[{i}] must be a [question, answer] pair of strings")
            out += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        user = f"{instruction}\n\n{extra}" if extra else instruction
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return out
    raise DataError(
        f"{where}: expected a 'messages' list or alpaca fields 'instruction'/'output' "
        f"(got keys: {', '.join(sorted(rec)) or 'none'})"
    )


def _text_record(rec: dict[str, Any], where: str) -> LLMExample:
    """A plain-text ``{"prompt", "completion"}`` record (no chat template at training or answer time)."""
    return LLMExample(prompt=_text(rec, "prompt", where, required=True),
                      completion=_text(rec, "completion", where, required=True), position=where)


def load_examples(paths: list[Path], report: DataReport | None = None) -> tuple[list[LLMExample], DataReport]:
    """Read and validate every record of ``paths``; empty answers are counted, warned about and dropped.

    Raises:
        DataError: a malformed record (``file:line``), or chat and plain-text records mixed in one run.
    """
    report = report or DataReport()
    examples: list[LLMExample] = []
    for path in paths:
        path = Path(path)
        report.files.append(str(path))
        n_before = report.records
        for pos, rec in read_records(path):
            where = _where(path, pos)
            if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and "messages" not in rec:
                example = _text_record(rec, where)
            else:
                msgs = record_to_messages(rec, where)
                example = LLMExample(prompt=msgs[:-1], completion=msgs[-1:], position=where)
            report.records += 1
            if not example.answer.strip():
                report.empty_answers += 1
                report.note("empty_answers", where)
                continue
            if examples and examples[0].chat != example.chat:
                kinds = ("chat" if example.chat else "plain-text", "chat" if examples[0].chat else "plain-text")
                raise DataError(f"{where}: a {kinds[0]} record among {kinds[1]} ones (first at "
                                f"{examples[0].position}); train one kind at a time")
            examples.append(example)
        if report.records == n_before:
            raise DataError(f"{path}: no records")
    if report.empty_answers:
        logger.warning(
            "%d record(s) with an empty answer dropped, first at: %s",
            report.empty_answers,
            "; ".join(report.positions["empty_answers"]),
        )
    return examples, report


def _token_counts(tokenizer, conversations: list[list[dict[str, str]]], add_generation_prompt: bool) -> list[int]:
    counts: list[int] = []
    for start in range(0, len(conversations), 256):
        out = tokenizer.apply_chat_template(
            conversations[start : start + 256], tokenize=True, add_generation_prompt=add_generation_prompt,
            return_dict=True,
        )
        counts += [len(ids) for ids in out["input_ids"]]
    return counts


def check_lengths(
    examples: list[LLMExample],
    tokenizer,
    max_length: int,
    on_overlength: Literal["drop", "truncate", "error"],
    report: DataReport,
) -> list[LLMExample]:
    """Tokenize each example with the chat template and apply the over-length policy.

    ``drop`` removes examples whose prompt + answer exceed ``max_length`` tokens; ``truncate`` keeps them and lets
    the trainer cut the end of the sequence (the answer's tail), but still drops those whose prompt alone fills the
    cutoff (nothing of the answer would remain); ``error`` raises. Every case is counted and warned about.

    Raises:
        DataError: ``on_overlength="error"`` and some example is too long (the message names the first positions).
    """
    report.max_length = max_length
    report.on_overlength = on_overlength
    kept: list[LLMExample] = []
    if examples and not examples[0].chat:
        prompt_counts = [len(tokenizer(ex.prompt)["input_ids"]) for ex in examples]
        total_counts = [len(tokenizer(ex.prompt + ex.completion)["input_ids"]) + 1 for ex in examples]  # + EOS
    else:
        prompt_counts = _token_counts(tokenizer, [ex.prompt for ex in examples], add_generation_prompt=True)
        full = [ex.prompt + ex.completion for ex in examples]
        total_counts = _token_counts(tokenizer, full, add_generation_prompt=False)
    for ex, n_prompt, n_total in zip(examples, prompt_counts, total_counts, strict=True):
        report.longest_tokens = max(report.longest_tokens, n_total)
        if n_total <= max_length:
            kept.append(ex)
            continue
        report.overlength += 1
        report.note("overlength", f"{ex.position} ({n_total} tokens)")
        if on_overlength == "truncate" and n_prompt < max_length:
            report.truncated += 1
            kept.append(ex)
        else:
            report.overlength_dropped += 1
    report.kept = len(kept)
    if report.overlength:
        first = "; ".join(report.positions["overlength"])
        if on_overlength == "error":
            raise DataError(
                f"{report.overlength} example(s) longer than the cutoff of {max_length} tokens, first at: {first} "
                "(raise --max-length, or use --on-overlength drop|truncate)"
            )
        logger.warning(
            "%d example(s) longer than the cutoff of %d tokens (%d truncated at the end of the answer, %d dropped), "
            "first at: %s",
            report.overlength,
            max_length,
            report.truncated,
            report.overlength_dropped,
            first,
        )
    if not kept:
        raise DataError(f"no usable examples left in {', '.join(report.files)} (see the warnings above)")
    return kept


class LengthBuckets:
    """A training sampler that batches examples of similar length: each epoch the indices are sorted by length (ties
    broken at random), cut into batches of ``batch_size`` and the batches shuffled.

    Every example is still seen once per epoch and the batches come in random order; only which examples share a
    batch changes, so a batch is padded to a length close to its own. On the demo's SFT data (154 examples, 57-435
    tokens: closed-book examples beside three-passage ones) random batches of 4 are 27% padding, bucketed ones 2%.
    ``set_epoch`` (called by the trainer's data loader) gives each epoch its own order; resuming replays it.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in the order they are trained on."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], rng.random()))
        # the data loader cuts the flat order into batches, so a short batch may only come last: the shortest
        # examples make it
        rest = len(order) % self.batch_size
        batches = [order[i : i + self.batch_size] for i in range(rest, len(order), self.batch_size)]
        rng.shuffle(batches)
        return batches + ([order[:rest]] if rest else [])

    def __iter__(self) -> Iterator[int]:
        return (i for batch in self.batches() for i in batch)

    def __len__(self) -> int:
        return len(self.lengths)
