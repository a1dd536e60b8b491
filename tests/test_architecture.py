"""Architecture checks: no import circles among ``dpa_rag`` modules (parsed with ``ast``, nothing is imported).

Two graphs are built from every module under ``src/dpa_rag``:

* the *top-level* graph: imports executed when a module is imported (module body, class bodies, module-level
  ``if``/``try``/``with`` blocks), except those under ``if TYPE_CHECKING:``;
* the *full* graph: the top-level graph plus imports inside functions.

The top-level graph must be acyclic (Python would fail or half-initialise a module otherwise), and so must the
full graph: a function-level ``dpa_rag`` import that would close a circle if moved to the top is a circle kept
alive by laziness. Lazy imports of heavy third-party libraries (torch, transformers, ...) are not edges here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "dpa_rag"
SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / PACKAGE


def _module_files() -> dict[str, Path]:
    """Map every module's dotted name (a package is named by its ``__init__.py``) to its file."""
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (what guards annotation-only imports)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _owning_module(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a ``dpa_rag`` module (``None`` for third-party names)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in MODULES:
            return name
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The ``dpa_rag`` modules one import statement loads (``from pkg import sub`` resolves to ``pkg.sub``)."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = _owning_module(alias.name)
            if target is not None:
                found.add(target)
        return found
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    owner = _owning_module(source)
    if owner is None:
        return found
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        found.add(sub if sub in MODULES else owner)
    return found


def _import_module_target(node: ast.AST) -> str | None:
    """The ``dpa_rag`` module of ``importlib.import_module("dpa_rag.x")`` / ``import_module(...)`` with a literal."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    arg = node.args[0]
    if name != "import_module" or not isinstance(arg, ast.Constant) or not isinstance(arg.value, str):
        return None
    return _owning_module(arg.value)


def _collect(module: str) -> tuple[set[str], set[str]]:
    """(top-level targets, function-level targets) of one module, excluding ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (lazy if in_function else top).update(_targets(node, module))
            return
        dynamic = _import_module_target(node)
        if dynamic is not None:
            (lazy if in_function else top).add(dynamic)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    top.discard(module)
    lazy.discard(module)
    return top, lazy


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    top: dict[str, set[str]] = {}
    full: dict[str, set[str]] = {}
    for module in MODULES:
        t, lazy = _collect(module)
        top[module] = t
        full[module] = t | lazy
    return top, full


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete circle inside a component, e.g. ``a -> b -> c -> a``."""
    members = set(component)
    start = component[0]
    path = [start]
    seen = {start}
    # walk inside the component until we return to a visited module
    current = start
    while True:
        nxt = sorted(w for w in graph[current] if w in members)
        back = [w for w in nxt if w == start]
        if back:
            return " -> ".join([*path, start])
        fresh = [w for w in nxt if w not in seen]
        current = fresh[0] if fresh else nxt[0]
        if current in seen:
            i = path.index(current)
            return " -> ".join([*path[i:], current])
        path.append(current)
        seen.add(current)


def test_modules_found() -> None:
    assert f"{PACKAGE}.reranker.rerank" in MODULES
    assert f"{PACKAGE}.pipeline.dpa" in MODULES


def test_import_resolution() -> None:
    """``from pkg import submodule`` names the submodule; ``from pkg import name`` names the package."""
    node = ast.parse("from dpa_rag.reranker import rerank, Reranker").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _targets(node, "dpa_rag.cli.main") == {"dpa_rag.reranker.rerank", "dpa_rag.reranker"}
    rel = ast.parse("from .fusion import fuse").body[0]
    assert isinstance(rel, ast.ImportFrom)
    assert _targets(rel, "dpa_rag.reranker.rerank") == {"dpa_rag.reranker.fusion"}
    call = ast.parse('importlib.import_module("dpa_rag.reranker.train")').body[0]
    assert isinstance(call, ast.Expr)
    assert _import_module_target(call.value) == "dpa_rag.reranker.train"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_type_checking_imports_are_skipped(tmp_path: Path) -> None:
    """An annotation-only import under ``if TYPE_CHECKING:`` is no edge; one inside a function is a lazy edge."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from dpa_rag.pipeline.dpa import build_steps\n"
        "def f():\n    from dpa_rag.io import write_json\n"
    )
    MODULES["dpa_rag._probe"] = tmp_path / "probe.py"
    MODULES["dpa_rag._probe"].write_text(source, encoding="utf-8")
    try:
        assert _collect("dpa_rag._probe") == (set(), {"dpa_rag.io"})
    finally:
        del MODULES["dpa_rag._probe"]


def test_no_top_level_import_cycles() -> None:
    top, _ = _graphs()
    cycles = _cycles(top)
    assert not cycles, "import circles among top-level imports:\n" + "\n".join(_describe(top, c) for c in cycles)


def test_no_function_level_import_breaks_a_cycle() -> None:
    """Moving every function-level ``dpa_rag`` import to the top must not create a circle."""
    _, full = _graphs()
    cycles = _cycles(full)
    if not cycles:
        return
    lines = [_describe(full, c) for c in cycles]
    pytest.fail("function-level imports hide import circles:\n" + "\n".join(lines))


# docs/architecture.md's layers, bottom (0) to top; a module may import its own layer and the ones below
LAYERS: dict[str, int] = {
    "": 0,  # dpa_rag/__init__.py (the version)
    "io": 0,
    "config": 0,
    "stage": 0,
    "jobs": 0,  # folder locks and preemption (every stage command, the trainers)
    "checkpoints": 0,  # automatic training resume (train-llm, train-reranker)
    "models": 0,
    "data": 0,
    "sample": 0,
    "eval.metrics": 0,  # pure metric functions, used by retrieval and every stage
    "eval.ranking": 0,  # the one ranking-metrics function (hit@k, ndcg@k, mrr), used by retrieval and the reranker
    "generation": 1,
    "retrieval": 1,
    "prompts": 1,
    "mining": 2,
    "augment": 2,
    "reranker": 2,
    "llm": 2,
    "rag": 2,
    "eval": 2,
    "pipeline": 3,
    "cli": 4,
    "serve": 4,
}


def _layer(module: str) -> int:
    rest = module[len(PACKAGE) + 1 :] if module != PACKAGE else ""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if rest == prefix or (prefix and rest.startswith(prefix + ".")):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in LAYERS (tests/test_architecture.py, docs/architecture.md)")


def test_no_upward_imports() -> None:
    """Nothing imports a higher layer (data/io/config → generation/retrieval → stages → pipeline → cli/serve)."""
    _, full = _graphs()
    upward = [f"{m} -> {x}" for m in sorted(full) for x in sorted(full[m]) if _layer(x) > _layer(m)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_cli_import_stays_light() -> None:
    """``dpa-rag --help`` must not pay for torch/transformers: the CLI imports stage modules only when a command
    runs (a fresh interpreter, so other tests' imports don't count)."""
    import subprocess
    import sys

    code = "import sys, dpa_rag.cli.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing dpa_rag.cli.main loads {out}"
