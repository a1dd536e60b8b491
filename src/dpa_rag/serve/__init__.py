"""``dpa-rag serve``: the aligned system behind the HTTP APIs RAG stacks already speak.

TEI/Jina/Cohere ``/rerank`` and Cohere v2 ``/v2/rerank``, ``/retrieve``, OpenAI ``/v1/chat/completions``,
``/v1/responses`` + ``/v1/models``, ``/answer``, ``/health``,
Prometheus ``/metrics`` and a comparison page at ``/``; concurrent requests are micro-batched into shared model
calls. Needs the ``serve`` extra (``pip install -e '.[serve]'``) for the HTTP parts; see ``docs/serve.md``.
"""

from __future__ import annotations

from dpa_rag.serve.batching import MicroBatcher, QueueFull
from dpa_rag.serve.config import ServeConfig
from dpa_rag.serve.engine import ALIGNED_MODEL, BASE_MODEL, Engine, load_scorer
from dpa_rag.serve.metrics import Metrics
from dpa_rag.serve.plan import ServePlan, make_plan
from dpa_rag.serve.server import ServerThread, build_app, run

__all__ = [
    "ALIGNED_MODEL",
    "BASE_MODEL",
    "Engine",
    "Metrics",
    "MicroBatcher",
    "QueueFull",
    "ServeConfig",
    "ServePlan",
    "ServerThread",
    "build_app",
    "load_scorer",
    "make_plan",
    "run",
]
