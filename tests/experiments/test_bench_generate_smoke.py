"""The generation benchmark runs end to end at a tiny size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_generate_tiny_runs() -> None:
    spec = importlib.util.spec_from_file_location("bench_generate_config", ROOT / "configs/bench_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from experiments.bench_generate import run

    metrics = run(module.get_config("tiny"))
    assert [row["batch"] for row in metrics["rows"]] == [2]
    for row in metrics["rows"]:
        assert row["prefill_tokens_per_s"] > 0 and row["plain_step_ms"] > 0
        assert set(row) >= {"decode_tokens_per_s", "loop_step_ms", "loop_overhead_ratio"}
    assert metrics["parameters"] > 0 and metrics["machine"]["backend"] == "cpu"
