"""Counters, gauges and histograms rendered in the Prometheus text format (no client library needed).

Metrics (all prefixed ``dpa_rag_``):

* ``requests_total{endpoint, status}``: requests answered, by endpoint and HTTP status;
* ``request_seconds{endpoint}``: latency histogram;
* ``errors_total{endpoint, type}``: error answers by error type (``invalid_request_error``, ``overloaded``, …);
* ``batch_size{model}``, ``batch_requests{model}``, ``batch_seconds{model}``: items and requests per model call,
  and the call's duration;
* ``queue_depth{model}``: requests waiting; ``rejected_total{model}``: requests refused because the queue was full.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# name → (type, help, buckets)
_DEFS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "dpa_rag_requests_total": ("counter", "Requests answered, by endpoint and HTTP status.", ()),
    "dpa_rag_request_seconds": ("histogram", "Request latency in seconds.", LATENCY_BUCKETS),
    "dpa_rag_errors_total": ("counter", "Error answers, by endpoint and error type.", ()),
    "dpa_rag_batch_size": ("histogram", "Items (pairs or prompts) per model call.", SIZE_BUCKETS),
    "dpa_rag_batch_requests": ("histogram", "Requests merged into one model call.", SIZE_BUCKETS),
    "dpa_rag_batch_seconds": ("histogram", "Duration of one model call in seconds.", LATENCY_BUCKETS),
    "dpa_rag_queue_depth": ("gauge", "Requests waiting for the model.", ()),
    "dpa_rag_rejected_total": ("counter", "Requests refused with 503 because the queue was full.", ()),
    "dpa_rag_disconnects_total": ("counter", "Requests whose client disconnected before the answer (cancelled).", ()),
}

Labels = tuple[tuple[str, str], ...]


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    """A thread-safe registry of the metrics above; :meth:`render` gives the ``/metrics`` body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {}
        self._hists: dict[str, dict[Labels, list[float]]] = {}  # bucket counts..., +Inf count, sum

    def _check(self, name: str, kind: str) -> None:
        if name not in _DEFS or _DEFS[name][0] != kind:
            raise KeyError(f"{name} is not a registered {kind}")

    def inc(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        """Add ``value`` to a counter."""
        self._check(name, "counter")
        with self._lock:
            series = self._values.setdefault(name, {})
            series[_key(labels)] = series.get(_key(labels), 0.0) + value

    def set(self, name: str, labels: dict[str, str], value: float) -> None:
        """Set a gauge."""
        self._check(name, "gauge")
        with self._lock:
            self._values.setdefault(name, {})[_key(labels)] = float(value)

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        """Record one observation in a histogram."""
        self._check(name, "histogram")
        buckets = _DEFS[name][2]
        with self._lock:
            series = self._hists.setdefault(name, {})
            h = series.setdefault(_key(labels), [0.0] * (len(buckets) + 2))
            h[bisect_left(buckets, value)] += 1  # the first bucket with value <= le (the last slot is +Inf)
            h[-1] += value

    def get(self, name: str, labels: dict[str, str]) -> float:
        """A counter's or gauge's value, or a histogram's observation count (0 when never recorded)."""
        with self._lock:
            if name in self._hists:
                h = self._hists[name].get(_key(labels))
                return sum(h[:-1]) if h else 0.0
            return self._values.get(name, {}).get(_key(labels), 0.0)

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text, buckets) in _DEFS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    for labels, h in sorted(self._hists.get(name, {}).items()):
                        cumulative = 0.0
                        for le, count in zip([*map(_num, buckets), "+Inf"], h[:-1], strict=True):
                            cumulative += count
                            lines.append(f"{name}_bucket{_fmt_labels(labels, (('le', le),))} {_num(cumulative)}")
                        lines.append(f"{name}_sum{_fmt_labels(labels)} {_num(h[-1])}")
                        lines.append(f"{name}_count{_fmt_labels(labels)} {_num(cumulative)}")
                else:
                    for labels, value in sorted(self._values.get(name, {}).items()):
                        lines.append(f"{name}{_fmt_labels(labels)} {_num(value)}")
        return "\n".join(lines) + "\n"
