"""The attention benchmark runs end to end at its tiny size on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_attention_tiny(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "experiments/bench_attention.py", "--config=configs/bench_attention.py:tiny",
        f"--config.out_dir={tmp_path}", "--config.run_name=smoke",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "bench_attention.png").stat().st_size > 0
    ok = {(r["kind"], r["phase"], r["impl"]) for r in metrics["rows"] if r["status"] == "ok"}
    for impl in ("xla", "pallas_tpu"):
        assert {("prefill", "fwd", impl), ("prefill", "fwd+bwd", impl), ("decode", "fwd", impl)} <= ok
    assert all(r["seconds"] > 0 for r in metrics["rows"] if r["status"] == "ok")
    assert metrics["copy_bandwidth_gbs"] > 0
    assert "copy bandwidth" in done.stdout
