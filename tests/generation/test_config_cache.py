from __future__ import annotations

from pathlib import Path

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from dpa_rag.cli.builder import add_stage_command
from dpa_rag.config import ConfigError, StageConfig, config_hash, load_config, save_config
from dpa_rag.generation import GenerationCache, GenerationParams, GeneratorOptions, build_generator
from dpa_rag.generation.fake import FakeGenerator


class DemoConfig(StageConfig):
    out_dir: Path = Field(description="Output folder.")
    top_k: int = Field(3, ge=0, description="Passages per question.")
    ranks: list[int] = Field(default_factory=lambda: [1, 25], description="Ranks to probe.")
    flag: bool = Field(True, description="A switch.")
    mode: str = Field("a", description="Mode.", json_schema_extra={"cli": ["--authors_mode"]})


def test_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("out_dir: x\ntop_k: 5\nranks: [1, 2, 3]\n")
    cfg = load_config(DemoConfig, y, {"top_k": 7, "flag": None})
    assert cfg.top_k == 7 and cfg.ranks == [1, 2, 3] and cfg.flag is True and cfg.out_dir == Path("x")


def test_unknown_key_is_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("out_dir: x\ntop_kk: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'top_kk'"):
        load_config(DemoConfig, y)
    with pytest.raises(ConfigError, match="'top_k'"):
        load_config(DemoConfig, None, {"out_dir": "x", "top_k": -1})
    y.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DemoConfig, y)


def test_save_roundtrip_and_hash(tmp_path):
    cfg = DemoConfig(out_dir=tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(DemoConfig, tmp_path / "config.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(cfg) != config_hash(DemoConfig(out_dir=tmp_path, top_k=4))


def test_cli_builder_options_and_errors(tmp_path):
    seen = {}

    def run(cfg: DemoConfig) -> Path:
        seen["cfg"] = cfg
        return cfg.out_dir

    app = typer.Typer()
    add_stage_command(app, "demo", DemoConfig, run, help="Demo stage.")

    @app.command("other")
    def _other() -> None:  # a second command so typer keeps sub-command names
        pass

    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--help"])
    assert res.exit_code == 0
    for text in ("--top-k", "Passages per question", "--no-flag", "--authors_mode", "--config"):
        assert text in res.output
    res = runner.invoke(
        app, ["demo", "--out-dir", str(tmp_path), "--ranks", "1", "--ranks", "50", "--no-flag", "--authors_mode", "b"]
    )
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.ranks == [1, 50] and cfg.flag is False and cfg.mode == "b" and cfg.top_k == 3
    y = tmp_path / "c.yaml"
    y.write_text(f"out_dir: {tmp_path}\ntop_k: 9\n")
    res = runner.invoke(app, ["demo", "--config", str(y), "--top-k", "2"])
    assert res.exit_code == 0 and seen["cfg"].top_k == 2
    y.write_text(f"out_dir: {tmp_path}\nbogus: 1\n")
    res = runner.invoke(app, ["demo", "--config", str(y)])
    assert res.exit_code == 2 and "unknown key 'bogus'" in res.output


def test_cache_roundtrip_and_counts(run_dir):
    opts = GeneratorOptions(backend="fake", batch_size=2, cache_dir=run_dir / "c")
    fake = FakeGenerator(fn=lambda p: p.upper())
    gen = build_generator(opts, backend=fake, progress=False)
    params = GenerationParams(max_new_tokens=4)
    prompts = ["a", "b", "a", [{"role": "user", "content": "c"}]]
    out = gen.generate(prompts, params)
    assert out == ["A", "B", "A", "USER: C"]
    assert fake.calls == 3 and fake.batches == 2  # duplicate "a" generated once
    gen2 = build_generator(opts, backend=FakeGenerator(fn=lambda p: "different"), progress=False)
    assert gen2.generate(prompts, params) == out
    assert gen2.calls == 0 and gen2.hits == 4
    # other params or model → miss
    assert gen2.generate(["a"], GenerationParams(max_new_tokens=5)) == ["different"]


def test_cache_keeps_finished_batches_on_failure(run_dir):
    cache = GenerationCache(run_dir / "g.sqlite")
    calls = {"n": 0}

    class Flaky(FakeGenerator):
        def generate(self, prompts, params):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("server died")
            return super().generate(prompts, params)

    from dpa_rag.generation.cache import CachedGenerator

    gen = CachedGenerator(Flaky(fn=str.upper), cache, batch_size=2, progress=False)
    with pytest.raises(RuntimeError):
        gen.generate(["a", "b", "c", "d"], GenerationParams())
    assert len(cache) == 2
    fresh = FakeGenerator(fn=str.upper)
    gen = CachedGenerator(fresh, cache, batch_size=2, progress=False)
    assert gen.generate(["a", "b", "c", "d"], GenerationParams()) == ["A", "B", "C", "D"]
    assert fresh.calls == 2
