"""configs/train_eagle.py end to end on a tiny random target: it trains on the self-distillation
data (written once, shared with Medusa's config), exports a drafter that loads for its
target only, and serves the speculative benchmark's spec_eagle with greedy's output (resuming is
tested in tests/decoding/drafters/test_eagle.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import speculative as speculative_config
from configs import train_eagle as train_eagle_config
from efficient.decoding.drafters import load_feature_drafter
from experiments.common import load_model, save_random_model
from experiments.run import run_experiment


def test_train_eagle_then_speculative_benchmark(tmp_path: Path) -> None:
    target = save_random_model(tmp_path / "target", size="tiny", seed=0)
    config = train_eagle_config.get_config("tiny")
    config.model.path = str(target)
    config.workdir, config.output_dir = str(tmp_path / "work"), str(tmp_path / "eagle")
    config.results_dir, config.run_name = str(tmp_path / "results"), "first"
    metrics = json.loads((run_experiment(config) / "metrics.json").read_text())
    record = metrics["record"]
    assert record["steps"] == config.train.steps
    rows = config.data.prompts - config.data.validation_rows + config.data.teacher_windows
    assert record["train_positions"] == rows * config.data.new_tokens
    assert 0.0 <= metrics["top1"] <= 1.0
    assert (tmp_path / "eagle" / "TRAINING.md").read_text().startswith("# EAGLE-style feature drafter")
    loaded = load_feature_drafter(tmp_path / "eagle", load_model(target).config)
    assert loaded.vocab.size == config.drafter.draft_vocab

    bench = speculative_config.get_config("tiny")
    bench.model.path, bench.eagle.path = str(target), str(tmp_path / "eagle")
    bench.decoders = "spec_eagle"
    bench.results_dir, bench.run_name = str(tmp_path / "results"), "bench"
    out = json.loads((run_experiment(bench) / "metrics.json").read_text())
    assert not out["skipped"], out["skipped"]
    eagle = [r for r in out["rows"] if r["decoder"].startswith("spec_eagle")]
    assert {r["decoder"] for r in eagle} == {"spec_eagle"}
    assert all(r["identical"] for r in eagle), eagle
    choice = out["eagle_goodput"][0]
    assert choice["calibrated"] and set(choice["seconds"]) == {"0", "2", "4", "8"}
    assert str(choice["width"]) == max(choice["goodput"], key=choice["goodput"].get)
    bench.eagle.tree_sizes, bench.run_name = (0,), "bad"
    with pytest.raises(ValueError, match="config.eagle.tree_sizes.*0"):
        run_experiment(bench)


def test_a_drafter_for_another_model_is_skipped_by_the_benchmark(tmp_path: Path) -> None:
    target = save_random_model(tmp_path / "target", size="tiny", seed=0)
    bench = speculative_config.get_config("tiny")
    bench.model.path = str(target)  # the default drafter is SmolLM2's (or absent): never this target's
    bench.decoders = "spec_eagle"
    bench.results_dir, bench.run_name = str(tmp_path / "results"), "bench"
    out = json.loads((run_experiment(bench) / "metrics.json").read_text())
    reason = out["skipped"]["spec_eagle"]
    assert "another model" in reason or "no feature drafter" in reason or "holds no feature drafter" in reason
