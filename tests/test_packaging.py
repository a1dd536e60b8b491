"""Packaging: what ``src/dpa_rag`` imports is declared in pyproject.toml; installed versions satisfy the bounds.

* Every third-party module imported anywhere in ``src/dpa_rag`` (module level, class bodies and inside functions,
  parsed with ``ast``, nothing is imported; ``if TYPE_CHECKING:`` blocks excluded) maps to a distribution that
  ``[project] dependencies`` or an optional extra declares. Installed modules map through
  ``importlib.metadata.packages_distributions()``; a module that is not installed here (an optional extra such as
  vllm) must match a declared name.
* Every declared requirement that is installed satisfies its specifier (the lower bounds are not below what this
  environment runs); a core dependency must be installed, an extra's may be absent (skipped).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dpa_rag"
PROJECT = "dpa-rag"
# import name → distribution name, for modules that are not installed here (installed ones map by metadata)
ALIASES = {"Stemmer": "pystemmer", "yaml": "pyyaml", "faiss": "faiss-cpu", "sklearn": "scikit-learn", "PIL": "pillow"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements() -> dict[str, list[Requirement]]:
    """``{"": core dependencies, extra: its requirements}``."""
    project = _pyproject()["project"]
    out = {"": [Requirement(r) for r in project.get("dependencies", [])]}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out[extra] = [Requirement(r) for r in reqs]
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(top-level module name, line) of every absolute import, at any depth, outside ``if TYPE_CHECKING:``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def third_party_imports() -> dict[str, list[str]]:
    """``{module: ["file:line", ...]}`` for every non-stdlib, non-``dpa_rag`` module imported under ``src/dpa_rag``."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    out: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for module, line in _imports(tree):
            if module in stdlib or module == "dpa_rag":
                continue
            out.setdefault(module, []).append(f"{path.relative_to(ROOT)}:{line}")
    return out


def test_the_import_scan_sees_top_level_function_level_and_skips_type_checking():
    tree = ast.parse(
        "import numpy as np\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pandas\n"
        "def f():\n    from transformers.models import bert\n    import torch.nn\nfrom . import x\n"
    )
    assert [m for m, _ in _imports(tree)] == ["numpy", "typing", "transformers", "torch"]
    found = third_party_imports()
    assert {"torch", "transformers", "sentence_transformers", "faiss", "typer"} <= set(found)
    assert "json" not in found and "dpa_rag" not in found
    assert "vllm" in found  # imported inside a function only


def test_every_imported_third_party_module_is_declared():
    declared = {canonicalize_name(r.name) for reqs in _requirements().values() for r in reqs}
    installed = md.packages_distributions()
    missing = []
    for module, where in sorted(third_party_imports().items()):
        dists = {canonicalize_name(d) for d in installed.get(module, [])}
        dists |= {canonicalize_name(ALIASES.get(module, module))}
        if not dists & declared:
            missing.append(f"{module} (distribution {', '.join(sorted(dists))}; imported at {', '.join(where[:3])})")
    assert not missing, "imported but declared in no dependency list or extra of pyproject.toml:\n" + "\n".join(
        missing
    )


def test_installed_versions_satisfy_the_declared_bounds():
    reqs = _requirements()
    extras = set(reqs) - {""}
    problems, skipped = [], []
    for extra, items in reqs.items():
        for req in items:
            if canonicalize_name(req.name) == PROJECT:  # gpu = ["dpa-rag[train,...]"]: the extras must exist
                unknown = set(req.extras) - extras
                if unknown:
                    problems.append(f"[{extra}] {req}: no such extra {sorted(unknown)}")
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                if extra:
                    skipped.append(f"{req.name} [{extra}]")
                else:
                    problems.append(f"{req}: a core dependency, not installed")
                continue
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"[{extra or 'dependencies'}] {req}: installed {version}")
    assert not problems, "\n".join(problems)
    if skipped:
        print("not installed here (optional, skipped):", ", ".join(sorted(skipped)))  # noqa: T201
