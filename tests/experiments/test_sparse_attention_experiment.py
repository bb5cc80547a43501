"""The sparse-attention experiment runs end to end at a smoke size on the trained byte-level
target: Quest reading every page scores exactly what dense scores, a sparser Quest keeps a
measured fraction of the attention mass, and every table cell is filled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import sparse_attention as sparse_config
from experiments.run import run_experiment
from experiments.sparse_attention import settings_from, top_pages


def test_sparse_attention_end_to_end(tmp_path: Path) -> None:
    config = sparse_config.get_config("tiny")
    config.results_dir, config.run_name = str(tmp_path), "smoke"
    config.contexts, config.fractions, config.tail, config.timing_repeats = (256,), (1.0, 0.125), 4, 1
    config.step_contexts, config.head_fractions = (256,), (0.125,)
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["method"]: r for r in metrics["summary"]}
    assert set(rows) == {"dense", "quest 1", "quest 0.125", "quest-heads 0.125"}
    assert rows["quest 1"]["bits_per_byte"] == pytest.approx(rows["dense"]["bits_per_byte"], rel=1e-6)
    assert rows["dense"]["attention_recall"] == rows["quest 1"]["attention_recall"] == 1.0
    assert 0.0 < rows["quest 0.125"]["attention_recall"] < 1.0
    assert 0.0 < rows["quest-heads 0.125"]["attention_recall"] < 1.0
    assert all(np.isfinite(r["bits_per_byte"]) and 0.0 <= r["exact_match"] <= 1.0 and r["attention_ms"] > 0
               for r in rows.values())
    assert [r["method"] for r in metrics["decode_step"]] == ["dense", "quest 1", "quest 0.125"]
    assert all(r["ms"] > 0 for r in metrics["decode_step"])
    assert (out / "density_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_pages_read_are_the_fraction_of_the_filled_pages() -> None:
    assert top_pages(0.125, 8176 + 12) == 64  # 512 pages of 16 slots
    assert top_pages(0.01, 64) == 4 and top_pages(1.0, 40) == 3  # the 4 always read, or every page


@pytest.mark.parametrize(("key", "value", "match"), [("fractions", (0.0,), "config.fractions"),
                                                     ("fractions", (1.5,), "config.fractions"),
                                                     ("contexts", (100,), "multiples of 16"),
                                                     ("tail", 0, "config.tail")])
def test_bad_settings_name_their_key(key: str, value: object, match: str) -> None:
    config = sparse_config.get_config("tiny")
    config[key] = value
    with pytest.raises(ValueError, match=match):
        settings_from(config)
