"""Loss curve of a training run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["plot_loss"]

logger = logging.getLogger(__name__)


def plot_loss(log_history: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """Plot ``loss`` against ``step`` from a trainer log history; returns the PNG path, or ``None`` if no loss."""
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    if not points:
        logger.warning("no loss values in the log history; %s not written", path)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps, losses = zip(*points, strict=True)
    ax.plot(steps, losses, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
