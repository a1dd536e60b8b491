"""``dpa-rag run`` (the whole pipeline from a YAML config) and ``dpa-rag demo`` (the bundled sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dpa_rag.cli.builder import DEDUPE_HELP
from dpa_rag.cli.errors import error_boundary
from dpa_rag.data.loaders import dedupe_ids

__all__ = ["register"]


def _echo_step(res) -> None:
    mark = {"ran": "ran", "skipped": "up to date", "disabled": "disabled"}[res.status]
    extra = f" ({res.seconds:.1f} s)" if res.status == "ran" else ""
    typer.echo(f"  {res.name:28s} {mark}{extra}")


def _run(cfg, from_step: str | None, force: bool, until: str | None, list_steps: bool) -> Path | None:
    from dpa_rag.pipeline import run_pipeline, step_names

    if list_steps:
        for name in step_names(cfg):
            typer.echo(name)
        return None
    typer.echo(f"run folder: {cfg.out_dir}")
    return run_pipeline(cfg, from_step=from_step, force=force, until=until, on_step=_echo_step)


def _check(cfg) -> None:
    """``run --check``: print what each step reads; exit 1 naming the step and path of every problem."""
    from dpa_rag.pipeline.check import check_pipeline

    result = check_pipeline(cfg)
    for name, reads in result.reads.items():
        typer.echo(f"  {name:28s} reads {len(reads)} path(s)")
    if not result.ok:
        typer.secho("error: --check found problems:\n  " + "\n  ".join(result.problems), fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(1)
    typer.echo(f"check: {len(result.reads)} steps OK")


def _load(config: Path, overrides: dict):
    from dpa_rag.config import load_config
    from dpa_rag.pipeline import PipelineConfig

    return load_config(PipelineConfig, config, overrides)


def register(app: typer.Typer) -> None:
    @app.command("run", rich_help_panel="Pipeline")
    def run(
        config: Path = typer.Argument(..., help="Pipeline YAML (see configs/ and docs/pipeline.md)."),
        out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Run folder (overrides the config's)."),  # noqa: UP045
        from_step: Optional[str] = typer.Option(  # noqa: UP045
            None, "--from", help="Re-run this step and every step after it, whatever their manifests say."
        ),
        until: Optional[str] = typer.Option(None, "--until", help="Stop after this step."),  # noqa: UP045
        force: bool = typer.Option(False, "--force", help="Re-run every step."),
        list_steps: bool = typer.Option(False, "--list-steps", help="Print the enabled steps and exit."),
        dedupe: bool = typer.Option(False, "--dedupe-ids", help=DEDUPE_HELP),
        check: bool = typer.Option(
            False, "--check", help="Dry run: validate every step's config and that each path a step reads is "
            "written upstream or exists; runs nothing.",
        ),
    ) -> None:
        """Run the DPA-RAG pipeline: index → retrieve → mine → augment → filter → build data → train reranker →
        rerank → train LLM → answer → report. Steps whose manifest matches their config and inputs are skipped,
        so a killed or repeated run resumes where it stopped."""
        with error_boundary("run"):
            cfg = _load(config, {"out_dir": out_dir, "dedupe_ids": True if dedupe else None})
            with dedupe_ids(cfg.dedupe_ids):
                if check:
                    _check(cfg)
                    return
                report = _run(cfg, from_step, force, until, list_steps)
        if report is not None:
            typer.echo(f"report: {report}")

    @app.command("demo", rich_help_panel="Pipeline")
    def demo(
        out_dir: Path = typer.Option(Path("runs/demo"), "--out-dir", help="Run folder."),
        from_step: Optional[str] = typer.Option(None, "--from", help="Re-run from this step."),  # noqa: UP045
        force: bool = typer.Option(False, "--force", help="Re-run every step."),
        list_steps: bool = typer.Option(False, "--list-steps", help="Print the enabled steps and exit."),
    ) -> None:
        """The whole pipeline on the bundled sample (220 questions: 100 well-known facts, 120 invented entities;
        747 passages) with the bundled models (MiniLM, SmolLM2-135M), sized for a laptop CPU. Prints where the report
        is."""
        from dpa_rag.pipeline import demo_config
        from dpa_rag.sample import demo_corpus, write_demo_questions

        with error_boundary("demo"):
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg = _load(
                demo_config(),
                {
                    "out_dir": out_dir,
                    "questions": write_demo_questions(out_dir / "sample_questions.jsonl"),
                    "corpus": demo_corpus(),
                },
            )
            report = _run(cfg, from_step, force, None, list_steps)
        if report is not None:
            typer.echo(f"report: {report}")
            metrics = report.parent / "metrics.json"
            if metrics.exists():
                import json

                for name, m in json.loads(metrics.read_text()).items():
                    parts = [f"all {m.get('hits@1', 0):5.1f}"]
                    parts += [f"{c} {m[f'category/{c}/hits@1']:5.1f}" for c in ("well-known", "invented")
                              if f"category/{c}/hits@1" in m]
                    typer.echo(f"  {name:22s} Hits@1 " + "  ".join(parts) + f"  (n={int(m.get('n', 0))})")
