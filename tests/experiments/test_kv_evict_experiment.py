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
    assert {p for p, _ in quality} == {"dense", "h2o", "needle_heads", "window_only", "sinks_plus_window"}
    assert all(r["bits_per_byte"] > 0 for r in quality.values())
    settings = {(r["press"], r["setting"]) for r in metrics["retrieval"]}
    assert settings == {("dense", "both"), ("h2o", "aware"), ("h2o", "agnostic"), ("needle_heads", "aware"),
                        ("needle_heads", "agnostic")}
    assert len(metrics["head_scores"]["needle_heads"]) == 2  # [L, K] of the 2-layer model
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
    config.presses = ("h2o", "quest")
    with pytest.raises(ValueError, match=r"config.presses: \['quest'\] are not policies"):
        settings_from(config)
    config = kv_evict_config.get_config("tiny")
    config.streaming.budget = 40
    with pytest.raises(ValueError, match="config.streaming.budget=40"):
        settings_from(config)


def test_calibration_too_short_for_the_needles_is_refused_with_its_key(tmp_path: Path) -> None:
    from experiments.kv_evict import calibrate_heads, settings_from
    from helpers.tiny import tiny_model

    from efficient.data import ByteTokenizer

    config = kv_evict_config.get_config("tiny")
    config.calibration.tokens = 64
    with pytest.raises(ValueError, match="config.calibration.tokens=64: context_tokens: 64 is too small"):
        calibrate_heads(tiny_model(vocab_size=256), ByteTokenizer(), settings_from(config), print)
