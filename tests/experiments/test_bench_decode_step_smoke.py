"""The decode-step benchmark runs end to end at a tiny size, every variant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _config(size: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_decode_step_config", ROOT / "configs/bench_decode_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)


def test_bench_decode_step_tiny_runs() -> None:
    from experiments.bench_decode_step import VARIANTS, run

    config = _config("tiny")
    metrics = run(config)
    assert [(r["batch"], r["capacity"], r["held"]) for r in metrics["rows"]] == [tuple(c) for c in config.cells]
    for row in metrics["rows"]:
        assert set(row["step_ms"]) == set(VARIANTS) and all(ms > 0 for ms in row["step_ms"].values())


def test_bench_decode_step_bad_cells_and_variants_are_refused() -> None:
    from experiments.bench_decode_step import run

    config = _config("tiny")
    config.variants = ("unrolled/ring",)
    with pytest.raises(ValueError, match="variants"):
        run(config)
    config = _config("tiny")
    config.cells = ((1, 16, 16),)
    with pytest.raises(ValueError, match="cells"):
        run(config)
