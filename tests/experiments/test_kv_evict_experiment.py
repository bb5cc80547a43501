"""The eviction experiment runs end to end on a tiny random model: every section is filled,
the dense rows are the reference, and a bounded cache's memory does not grow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import kv_evict as kv_evict_config
from experiments.common import save_random_model
from experiments.run import run_experiment


def test_kv_evict_end_to_end(tmp_path: Path) -> None:
    config = kv_evict_config.get_config("tiny")
    config.model.path = str(save_random_model(tmp_path / "model"))
    config.results_dir, config.run_name = str(tmp_path), "smoke"
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    quality = {(r["press"], r["kept"]): r for r in metrics["quality"]}
    assert {p for p, _ in quality} == {"dense", "h2o", "window_only", "sinks_plus_window"}
    assert all(r["bits_per_byte"] > 0 for r in quality.values())
    settings = {(r["press"], r["setting"]) for r in metrics["retrieval"]}
    assert settings == {("dense", "both"), ("h2o", "aware"), ("h2o", "agnostic")}
    assert all(0 <= r["exact"] <= 1 for r in metrics["retrieval"])
    assert {r["press"] for r in metrics["speed"]} == {"dense", "streaming_llm", "h2o"}
    assert (out / "kv_evict.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_fractions_are_refused_with_their_key() -> None:
    from experiments.kv_evict import settings_from

    config = kv_evict_config.get_config("tiny")
    config.kept = (1.5,)
    with pytest.raises(ValueError, match="config.kept"):
        settings_from(config)
    config = kv_evict_config.get_config("tiny")
    config.streaming.budget = 40
    with pytest.raises(ValueError, match="config.streaming.budget=40"):
        settings_from(config)
