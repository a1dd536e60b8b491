"""Reports comparing systems: a markdown table, the same numbers as JSON, and a bar plot.

``results`` everywhere is ``{system name: {metric key: value}}`` as produced by
:func:`~dpa_rag.eval.evaluate.evaluate_predictions` (answer metrics ×100, ``n``; per-category keys look like
``category/<value>/<metric>``). The pipeline reuses these functions for its final report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from dpa_rag.io import write_json, write_text

__all__ = ["MAIN_COLUMNS", "bar_plot", "markdown_table", "render_report", "write_report"]

logger = logging.getLogger(__name__)

# metric key -> column header, in display order; a column is shown when some system has the key
MAIN_COLUMNS = {
    "n": "n",
    "hits@1": "Hits@1",
    "hit_word": "Hit (word)",
    "em": "EM",
    "f1": "F1",
    "answer_recall": "Answer recall",
    "n_ctx": "Passages",
}
_CATEGORY_COLUMNS = {"n": "n", "hits@1": "Hits@1", "em": "EM", "f1": "F1"}


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key == "n" or key.endswith("/n") or key == "n_unlabelled":
        return str(int(value))
    return f"{value:.2f}"


def markdown_table(
    results: Mapping[str, Mapping[str, float]],
    columns: Mapping[str, str] | None = None,
    prefix: str = "",
    label: str = "System",
    skip_empty: bool = False,
) -> str:
    """A markdown table: one row per system, one column per metric present in some system (keys ``prefix+key``).

    Missing values show as a dash; with ``skip_empty`` a system with none of the shown keys gets no row.
    """
    columns = dict(columns or MAIN_COLUMNS)
    shown = [k for k in columns if any(f"{prefix}{k}" in r for r in results.values())]
    header = f"| {label} | " + " | ".join(columns[k] for k in shown) + " |"
    rule = "|---|" + "|".join("---:" for _ in shown) + "|"
    rows = [
        f"| {name} | " + " | ".join(_fmt(k, r.get(f"{prefix}{k}")) for k in shown) + " |"
        for name, r in results.items()
        if not skip_empty or any(f"{prefix}{k}" in r for k in shown)
    ]
    return "\n".join([header, rule, *rows])


def _categories(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    cats: dict[str, None] = {}
    for r in results.values():
        for key in r:
            if key.startswith("category/"):
                cats[key.split("/")[1]] = None
    return sorted(cats)


def render_report(
    results: Mapping[str, Mapping[str, float]], title: str = "QA evaluation", extra_sections: Sequence[str] = ()
) -> str:
    """The markdown text of a report (see :func:`write_report`)."""
    parts = [
        f"# {title}",
        "Hits@1 = a normalised gold answer is a substring of the normalised prediction (the DPA-RAG files' `em`); "
        "Hit (word) = the same on whole words; EM = exact match after normalisation; F1 = max token F1 over golds "
        "(method.md §2.1). All ×100; n = questions with gold answers.",
        markdown_table(results),
    ]
    unlabelled = {n: r["n_unlabelled"] for n, r in results.items() if r.get("n_unlabelled")}
    if unlabelled:
        parts.append("Not scored (no gold answer): " + ", ".join(f"{n} {int(v)}" for n, v in unlabelled.items()) + ".")
    for cat in _categories(results):
        parts.append(f"## Category {cat}")
        parts.append(markdown_table(results, _CATEGORY_COLUMNS, prefix=f"category/{cat}/", skip_empty=True))
    parts.extend(s.strip() for s in extra_sections if s.strip())
    return "\n\n".join(parts) + "\n"


def write_report(
    results: Mapping[str, Mapping[str, float]],
    out_dir: str | Path,
    title: str = "QA evaluation",
    extra_sections: Sequence[str] = (),
    extra_json: Mapping[str, object] | None = None,
) -> Path:
    """Write ``metrics.json`` (``results`` as is) and ``report.md`` into ``out_dir``; return the report's path.

    Args:
        results: ``{system: {metric: value}}``.
        out_dir: created if missing.
        title: the report's heading.
        extra_sections: markdown blocks appended after the tables (e.g. inputs, settings, notes).
        extra_json: top-level blocks added to ``metrics.json`` after the systems (e.g. ``{"paired": ...}``); a key
            equal to a system name is an error.

    Raises:
        ValueError: a key of ``extra_json`` is also a system name.
    """
    out_dir = Path(out_dir)
    clash = [k for k in extra_json or {} if k in results]
    if clash:
        raise ValueError(f"metrics.json block(s) {clash} clash with system names")
    write_json(out_dir / "metrics.json", {**{name: dict(r) for name, r in results.items()}, **(extra_json or {})})
    return write_text(out_dir / "report.md", render_report(results, title, extra_sections))


def bar_plot(
    results: Mapping[str, Mapping[str, float]],
    path: str | Path,
    metrics: Sequence[str] = ("hits@1", "em", "f1"),
    title: str | None = None,
) -> Path:
    """A grouped bar chart (PNG) comparing systems on ``metrics``; drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    metrics = [m for m in metrics if any(m in r for r in results.values())]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 1.2 * len(metrics) * max(len(names), 1) * 0.6), 3.5))
    try:
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
            values = [results[name].get(m, 0.0) for m in metrics]
            bars = ax.bar(xs, values, width=width, label=name)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(metrics)), [MAIN_COLUMNS.get(m, m) for m in metrics])
        ax.set_ylabel("score (×100)")
        ax.set_ylim(0, 105)
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
