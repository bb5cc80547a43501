"""The prefix-sharing experiment runs end to end on a tiny random model: paged prefix sharing
gives the dense cache's logits with less memory once requests share the prompt."""

from __future__ import annotations

import json
from pathlib import Path

from configs import prefix_sharing as prefix_sharing_config
from experiments.common import save_random_model
from experiments.run import run_experiment


def test_prefix_sharing_end_to_end(tmp_path: Path) -> None:
    config = prefix_sharing_config.get_config("tiny")
    config.model.path = str(save_random_model(tmp_path / "model"))
    config.results_dir, config.run_name = str(tmp_path), "smoke"
    rows = json.loads((run_experiment(config) / "metrics.json").read_text())["rows"]
    assert [r["requests"] for r in rows] == [1, 2]
    assert all(r["max_logit_diff"] < 1e-4 and not r["exhausted"] for r in rows)
    assert rows[1]["paged_mib"] < rows[1]["dense_mib"]
