"""The hybrid-cache experiment runs end to end (tiny Gemma 3 shape) and finds the hybrid
cache equal to the dense one, smaller, and flat in context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import hybrid_cache as hybrid_cache_config
from experiments.hybrid_cache import settings_from
from experiments.run import run_experiment


def test_hybrid_cache_end_to_end(tmp_path: Path) -> None:
    config = hybrid_cache_config.get_config("tiny")
    config.results_dir, config.run_name = str(tmp_path), "smoke"
    out = run_experiment(config)
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [(r["context"], r["cache"]) for r in rows] == [(16, "dense"), (16, "hybrid"), (48, "dense"), (48, "hybrid")]
    assert all(r["max_logit_diff"] <= 1e-4 * max(1.0, r["max_abs_logit"]) for r in rows)
    hybrid = [r["cache_mib"] for r in rows if r["cache"] == "hybrid"]
    dense = [r["cache_mib"] for r in rows if r["cache"] == "dense"]
    assert hybrid[1] < dense[1] and hybrid[1] - hybrid[0] < dense[1] - dense[0]
    assert (out / "hybrid_cache.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_contexts_name_their_key() -> None:
    config = hybrid_cache_config.get_config("tiny")
    config.contexts = (64, 16)
    with pytest.raises(ValueError, match="config.contexts"):
        settings_from(config)
