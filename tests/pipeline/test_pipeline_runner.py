from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from dpa_rag.config import StageConfig
from dpa_rag.io import write_text
from dpa_rag.pipeline.runner import Step, run_steps
from dpa_rag.stage import stage_recorder


class ToyConfig(StageConfig):
    src: Path
    out_dir: Path
    suffix: str = Field("!")


def _toy_steps(source: Path, suffix: str, calls: list[str]) -> list[Step]:
    def make_run(name: str):
        def run(cfg: ToyConfig) -> Path:
            calls.append(name)
            rec = stage_recorder(name, cfg, cfg.out_dir, [cfg.src])
            text = Path(cfg.src).read_text() + cfg.suffix
            write_text(cfg.out_dir / "out.txt", text)
            rec.finish(outputs=["out.txt"], chars=len(text))
            return cfg.out_dir / "out.txt"

        return run

    return [
        Step(
            "a", [], lambda f: ToyConfig(src=source, out_dir=f["a"], suffix=suffix), make_run("a")
        ),
        Step(
            "b", ["a"], lambda f: ToyConfig(src=f["a"] / "out.txt", out_dir=f["b"]), make_run("b")
        ),
        Step(
            "c", ["b"], lambda f: ToyConfig(src=f["b"] / "out.txt", out_dir=f["c"]), make_run("c")
        ),
    ]


def test_skip_invalidate_from_force(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    run_dir = tmp_path / "run"
    calls: list[str] = []
    run_steps(_toy_steps(src, "!", calls), run_dir)
    assert calls == ["a", "b", "c"]
    assert (run_dir / "c" / "out.txt").read_text() == "x!!!"

    calls.clear()
    res = run_steps(_toy_steps(src, "!", calls), run_dir)
    assert calls == [] and [r.status for r in res] == ["skipped"] * 3

    # a config value changes → that step and everything after it
    calls.clear()
    run_steps(_toy_steps(src, "?", calls), run_dir)
    assert calls == ["a", "b", "c"]
    assert (run_dir / "c" / "out.txt").read_text() == "x?!!"

    # an input file changes
    calls.clear()
    src.write_text("y")
    run_steps(_toy_steps(src, "?", calls), run_dir)
    assert calls == ["a", "b", "c"]

    # deleting one stage's output re-runs that stage and the ones after it only
    calls.clear()
    (run_dir / "b" / "out.txt").unlink()
    run_steps(_toy_steps(src, "?", calls), run_dir)
    assert calls == ["b", "c"]

    calls.clear()
    run_steps(_toy_steps(src, "?", calls), run_dir, from_step="b")
    assert calls == ["b", "c"]
    calls.clear()
    run_steps(_toy_steps(src, "?", calls), run_dir, force=True)
    assert calls == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unknown step"):
        run_steps(_toy_steps(src, "?", calls), run_dir, from_step="zz")


def test_killed_step_reruns(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    run_dir = tmp_path / "run"
    calls: list[str] = []
    steps = _toy_steps(src, "!", calls)
    original = steps[1].run

    def killed(cfg):
        raise KeyboardInterrupt

    steps[1].run = killed
    with pytest.raises(KeyboardInterrupt):
        run_steps(steps, run_dir)
    assert calls == ["a"]
    calls.clear()
    steps = _toy_steps(src, "!", calls)
    run_steps(steps, run_dir)
    assert calls == ["b", "c"]
    steps[1].run = original
    assert (run_dir / "c" / "out.txt").read_text() == "x!!!"


def test_disabled_dependency_is_an_error(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    steps = _toy_steps(src, "!", [])
    steps[0].enabled = False
    with pytest.raises(ValueError, match="needs a"):
        run_steps(steps, tmp_path / "run")
