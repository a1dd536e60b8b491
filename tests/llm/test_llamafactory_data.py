"""The authors' trainer reads ``build-llm-data``'s files: LLaMA-Factory's own dataset registry parser and alpaca
converter, run on ``dataset_info.json`` + ``prealign.json``/``sft.json`` as the stage writes them, give the chat
turns our chat JSONL holds.

LLaMA-Factory is not a dependency: point ``DPA_RAG_LLAMAFACTORY`` at a throwaway install, e.g.
``pip install --no-deps --target /tmp/lf llamafactory==0.8.1`` (or ``llmtuner==0.6.3``, the authors' other version),
then ``DPA_RAG_LLAMAFACTORY=/tmp/lf pytest tests/llm/test_llamafactory_data.py``. Only ``data/parser.py`` and
``data/aligner.py`` are imported (the package ``__init__`` files pull in a trainer stack pinned to older
transformers); without the variable the test is skipped.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import types
from pathlib import Path

import pytest

from dpa_rag.mining.llm_data import dataset_info, to_alpaca

LF = os.environ.get("DPA_RAG_LLAMAFACTORY")
pytestmark = pytest.mark.skipif(not LF, reason="set DPA_RAG_LLAMAFACTORY to a LLaMA-Factory --target install")


def _load(monkeypatch, root: str) -> tuple[types.ModuleType, types.ModuleType]:
    pkg = "llamafactory" if (Path(root) / "llamafactory").is_dir() else "llmtuner"
    monkeypatch.syspath_prepend(root)
    for name in (pkg, f"{pkg}.data", f"{pkg}.extras"):  # namespace stand-ins: their __init__ files are not run
        module = types.ModuleType(name)
        module.__path__ = [str(Path(root, *name.split(".")))]
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n.startswith(f"{pkg}.")]:
        if name not in (f"{pkg}.data", f"{pkg}.extras"):
            monkeypatch.delitem(sys.modules, name)
    return importlib.import_module(f"{pkg}.data.parser"), importlib.import_module(f"{pkg}.data.aligner")


def test_llamafactory_reads_build_llm_data_files(tmp_path, monkeypatch):
    parser, aligner = _load(monkeypatch, LF)
    chats = {
        "prealign.json": [{"role": "system", "content": "Judge the document."},
                          {"role": "user", "content": "Question: who wrote Hamlet?\nDocument: ..."},
                          {"role": "assistant", "content": "Positive"}],
        "sft.json": [{"role": "system", "content": "Answer from the passages."},
                     {"role": "user", "content": "[1] Hamlet is by Shakespeare.\nQuestion: who wrote Hamlet?"},
                     {"role": "assistant", "content": "Shakespeare"}],
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(dataset_info("dpa_rag")))  # what build-llm-data writes
    for name, chat in chats.items():
        (tmp_path / name).write_text(json.dumps([to_alpaca(chat)]))
    data_args = types.SimpleNamespace(dataset="dpa_rag_prealign,dpa_rag_sft", dataset_dir=str(tmp_path),
                                      interleave_probs=None, streaming=False, media_dir=str(tmp_path))
    attrs = parser.get_dataset_list(data_args)
    assert [a.dataset_name for a in attrs] == ["prealign.json", "sft.json"]
    for attr in attrs:
        assert attr.load_from == "file" and attr.formatting == "alpaca"
        rows = json.loads((tmp_path / attr.dataset_name).read_text())
        examples = {key: [row[key] for row in rows] for key in rows[0]}
        args = (examples, attr, data_args)[: len(inspect.signature(aligner.convert_alpaca).parameters)]
        out = aligner.convert_alpaca(*args)
        system, user, assistant = chats[attr.dataset_name]
        assert out["system"][0] == system["content"]
        assert out["prompt"][0] == [{"role": "user", "content": user["content"]}]
        assert out["response"][0] == [{"role": "assistant", "content": assistant["content"]}]
