"""The sparse-prefill experiment runs end to end at a smoke size on the trained byte-level
target: a density-1 search scores exactly what dense scores, a sparse one keeps a measured
fraction of the attention mass at its density, pattern files are written for load_patterns,
and every table cell is filled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import sparse_prefill as sparse_config
from efficient.attention.sparse_prefill_search import load_patterns
from efficient.models import load_config
from experiments.run import run_experiment
from experiments.sparse_prefill import settings_from


def test_sparse_prefill_end_to_end(tmp_path: Path) -> None:
    config = sparse_config.get_config("tiny")
    config.results_dir, config.run_name, config.patterns_dir = str(tmp_path), "smoke", str(tmp_path / "patterns")
    config.densities = (1.0, 0.8)  # the sink, local band and last block alone: 0.72
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["method"]: r for r in metrics["summary"]}
    assert set(rows) == {"dense", "minference 1", "minference 0.8"}
    assert rows["minference 1"]["bits_per_byte"] == pytest.approx(rows["dense"]["bits_per_byte"], rel=1e-5)
    assert rows["minference 1"]["attention_recall"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["search"]["densities"]["0.8"]["density"] <= 0.8 + 1e-6  # on the calibration file
    assert 0.0 < rows["minference 0.8"]["attention_recall"] < 1.0 and rows["minference 0.8"]["density"] < 1.0
    assert all(np.isfinite(r["bits_per_byte"]) and 0.0 <= r["exact_match"] <= 1.0 and r["attention_ms"] > 0
               and r["prefill_s"] > 0 for r in rows.values())
    assert (out / "density_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    patterns = load_patterns(tmp_path / "patterns" / "patterns-0.8.json", load_config(config.model.path))
    assert patterns.block == config.block and patterns.min_tokens == config.min_tokens


@pytest.mark.parametrize(("key", "value", "match"), [("densities", (0.0,), "config.densities"),
                                                     ("contexts", (64,), "config.min_tokens"),
                                                     ("block", 0, "config.block")])
def test_bad_settings_name_their_key(key: str, value: object, match: str) -> None:
    config = sparse_config.get_config("tiny")
    config[key] = value
    with pytest.raises(ValueError, match=match):
        settings_from(config)
