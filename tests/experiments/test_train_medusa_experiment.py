"""configs/train_medusa.py end to end on a tiny random target: self-distillation data and heads
are written, a second run resumes (nothing regenerated or retrained), the exported heads load for
their target and serve the speculative benchmark's spec_medusa with greedy's output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import speculative as speculative_config
from configs import train_medusa as train_medusa_config
from efficient.decoding.drafters import load_medusa_heads
from experiments.common import load_model, save_random_model
from experiments.run import run_experiment


def test_train_medusa_then_speculative_benchmark(tmp_path: Path) -> None:
    target = save_random_model(tmp_path / "target", size="tiny", seed=0)
    config = train_medusa_config.get_config("tiny")
    config.model.path = str(target)
    config.workdir, config.output_dir = str(tmp_path / "work"), str(tmp_path / "heads")
    config.results_dir, config.run_name = str(tmp_path / "results"), "first"
    first = run_experiment(config)
    metrics = json.loads((first / "metrics.json").read_text())
    record = metrics["record"]
    assert record["steps"] == config.train.steps and record["num_heads"] == config.heads.num_heads
    rows = config.data.prompts - config.data.validation_rows + config.data.teacher_windows
    assert record["train_positions"] == rows * config.data.new_tokens
    accuracy = np.asarray(metrics["accuracy"])
    assert accuracy.shape == (config.heads.num_heads, config.heads.ranks)
    assert ((accuracy >= 0) & (accuracy <= 1)).all() and accuracy.sum(axis=1).max() <= 1 + 1e-9
    assert (tmp_path / "heads" / "TRAINING.md").read_text().startswith("# Medusa-1 heads")
    parts = sorted((tmp_path / "work" / "data").glob("part-*.npz"))
    assert len(parts) == config.data.prompts // config.data.batch_size
    parts += sorted((tmp_path / "work" / "teacher").glob("part-*.npz"))
    assert len(parts) == (config.data.prompts + config.data.teacher_windows) // config.data.batch_size
    stamps = [p.stat().st_mtime_ns for p in parts]
    loaded = load_medusa_heads(tmp_path / "heads", load_model(target).config)
    np.testing.assert_array_equal(loaded.accuracy, accuracy)

    config.run_name = "again"  # resumes: data parts kept, training already at its last step
    again = json.loads((run_experiment(config) / "metrics.json").read_text())
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    np.testing.assert_allclose(again["accuracy"], metrics["accuracy"])

    bench = speculative_config.get_config("tiny")
    bench.model.path, bench.medusa.path = str(target), str(tmp_path / "heads")
    bench.decoders, bench.medusa.tree_sizes = "spec_medusa", (2,)
    bench.results_dir, bench.run_name = str(tmp_path / "results"), "bench"
    out = json.loads((run_experiment(bench) / "metrics.json").read_text())
    assert not out["skipped"], out["skipped"]
    medusa = [r for r in out["rows"] if r["decoder"].startswith("spec_medusa")]
    assert {r["decoder"] for r in medusa} == {"spec_medusa", "spec_medusa_w2"}
    assert all(r["identical"] for r in medusa), medusa
    choice = out["medusa_goodput"][0]  # the goodput table: a plain step and every width measured
    assert choice["batch"] == bench.generation.batch_sizes[0] and set(choice["seconds"]) >= {"0", "1", "16"}
    assert choice["calibrated"]  # tokens per step measured on the harness's calibration rows
    assert str(choice["width"]) == max(choice["goodput"], key=choice["goodput"].get)  # JSON keys are strings
    bench.medusa.tree_sizes, bench.run_name = (0,), "bad"
    with pytest.raises(ValueError, match="config.medusa.tree_sizes.*0"):
        run_experiment(bench)


def test_heads_for_another_model_are_skipped_by_the_benchmark(tmp_path: Path) -> None:
    target = save_random_model(tmp_path / "target", size="tiny", seed=0)
    bench = speculative_config.get_config("tiny")
    bench.model.path = str(target)  # the default heads are SmolLM2's (or absent): never this target's
    bench.decoders = "spec_medusa"
    bench.results_dir, bench.run_name = str(tmp_path / "results"), "bench"
    out = json.loads((run_experiment(bench) / "metrics.json").read_text())
    assert "spec_medusa" in out["skipped"]
    assert "another model" in out["skipped"]["spec_medusa"] or "no Medusa heads" in out["skipped"]["spec_medusa"]


@pytest.mark.parametrize("size", ["huge"])
def test_unknown_config_variant_is_refused(size: str) -> None:
    with pytest.raises(ValueError, match="'default' or 'tiny'"):
        train_medusa_config.get_config(size)
