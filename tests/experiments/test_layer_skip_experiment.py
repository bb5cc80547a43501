"""The layer-skip calibration experiment runs end to end on a tiny random model and
reports a trace whose chosen size has the best estimated speedup."""

from __future__ import annotations

import json
from pathlib import Path

from configs import layer_skip as layer_skip_config
from experiments.common import save_random_model
from experiments.run import run_experiment


def test_layer_skip_end_to_end(tmp_path: Path) -> None:
    config = layer_skip_config.get_config("tiny")
    config.model.path = str(save_random_model(tmp_path / "model", size="tiny"))
    config.results_dir, config.run_name = str(tmp_path), "smoke"
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert rows[0]["skipped"] == 0 and metrics["num_layers"] == 2
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["skipped"] == len(metrics["skip_layers"]) >= 1
    assert chosen["estimated_speedup"] == max(r["estimated_speedup"] for r in rows[1:])
    assert 0 < metrics["fixed_cost_fraction"] < 1 and metrics["calibration_seconds"] > 0
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
