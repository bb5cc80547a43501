"""The speculative benchmark runs end to end on tiny random target and draft models:
files are written, every lossless greedy decoder reproduces greedy decoding, and
there is a row per task x batch x decoder; bad settings name their config key."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest

from configs import speculative as speculative_config
from efficient import variants
from experiments.common import save_random_model
from experiments.run import run_experiment
from experiments.speculative import BASELINES, select_decoders, settings_from

RESOURCES = {"draft_model", "calibration_tokens"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spec_models")
    return (save_random_model(root / "target", size="tiny", seed=0),
            save_random_model(root / "draft", size="tiny", seed=1))


def _one_per_resource() -> list[str]:
    """The first registered decoder for each distinct `needs` the harness serves (compiling
    every drafter twice would take minutes on a slow CPU)."""
    seen, names = set(), []
    for d in variants.decoders():
        if d.name not in BASELINES and d.needs not in seen and set(d.needs) <= RESOURCES:
            seen.add(d.needs)
            names.append(d.name)
    return names


def _config(models: tuple[Path, Path], results: Path) -> ml_collections.ConfigDict:
    config = speculative_config.get_config("tiny")
    config.model.path, config.draft.path = str(models[0]), str(models[1])
    config.results_dir, config.run_name = str(results), "smoke"
    return config


def test_speculative_end_to_end(models: tuple[Path, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(models, tmp_path)
    config.decoders = ",".join(_one_per_resource())
    config.lock()
    out = run_experiment(config)
    assert out == tmp_path / "speculative" / "smoke"
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["draft"]["path"] == str(models[1])
    for name in ("speedup", "mean_accepted"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert not metrics["skipped"], metrics["skipped"]
    names = ["greedy", *_one_per_resource()]
    keys = {(r["task"], r["batch_size"], r["decoder"]) for r in metrics["rows"]}
    assert keys == {(t, b, n) for t in config.tasks.kinds for b in config.generation.batch_sizes for n in names}
    assert len(metrics["rows"]) == len(keys)
    for row in metrics["rows"]:
        assert row["error"] is None, row
        assert row["e2e_seconds"] > 0 and row["speedup"] > 0 and row["target_forwards"] > 0
        assert row["generated_tokens"] == row["prompts"] * config.generation.max_new_tokens
        if row["expect_identical"]:
            assert row["identical"] and row["agreement"] == 1.0, row
        if row["decoder"] == "greedy":
            assert row["speedup"] == 1.0 and row["mean_accepted_tokens"] is None
        else:
            assert row["mean_accepted_tokens"] >= 1.0 and row["acceptance_by_depth"]
    assert metrics["machine"]["cpu_count"] and metrics["machine"]["jax"]
    assert set(metrics["prompts"]) == set(config.tasks.kinds)
    printed = capsys.readouterr().out
    assert "speedup" in printed and "accepted" in printed and "[speculative" in printed


def test_bad_settings_name_their_key(models: tuple[Path, Path], tmp_path: Path) -> None:
    config = _config(models, tmp_path)
    config.generation.batch_sizes = (3,)
    with pytest.raises(ValueError, match="batch_sizes"):
        settings_from(config)
    config = _config(models, tmp_path)
    config.tasks.kinds = ("completion", "poetry")
    with pytest.raises(ValueError, match="config.tasks.kinds"):
        settings_from(config)
    with pytest.raises(ValueError, match="config.decoders"):
        select_decoders("greedy,no_such_decoder")
    assert [d.name for d in select_decoders("greedy,spec_draft")] == ["spec_draft"]


def test_missing_draft_is_skipped_with_reason(models: tuple[Path, Path], tmp_path: Path) -> None:
    config = _config(models, tmp_path)
    config.draft.path = str(tmp_path / "no_draft")
    config.decoders = "spec_draft"
    config.tasks.kinds = ("completion",)
    config.generation.batch_sizes = (2,)
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "config.draft.path" in metrics["skipped"]["spec_draft"]
    assert {r["decoder"] for r in metrics["rows"]} == {"greedy"}
