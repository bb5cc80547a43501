"""`experiments.bench_peer` runs end to end (ours and transformers on one tiny HF folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_peer_tiny_runs_every_side(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from experiments.common import save_random_model

    folder = save_random_model(tmp_path / "model", size="tiny")
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench_peer", "--config=configs/bench_peer.py:tiny",
         f"--config.model={folder}", f"--config.out_dir={tmp_path / 'out'}", "--config.run_name=smoke",
         "--config.also_layer_loop=scan"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "smoke" / "metrics.json").read_text())
    kinds = {(c["kind"], c["dtype"]) for c in metrics["cells"]}
    assert kinds == {("prefill", "float32"), ("decode", "float32")}
    for cell in metrics["cells"]:
        assert cell["efficient_tokens_per_s"] > 0 and cell["transformers_tokens_per_s"] > 0
        assert cell["efficient_scan_tokens_per_s"] > 0  # ours again over stacked layers, interleaved
        assert cell["speedup"] == pytest.approx(cell["transformers_seconds"] / cell["efficient_seconds"])
    assert metrics["machine"]["omp_wait_policy"] == "PASSIVE"
