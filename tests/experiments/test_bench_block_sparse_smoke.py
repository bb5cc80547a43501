"""The block-sparse benchmark runs end to end at a smoke size and writes its rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def test_bench_block_sparse_quick_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import bench_block_sparse

    out = tmp_path / "metrics.json"
    monkeypatch.setattr(sys, "argv", ["bench_block_sparse", "--quick", "--densities", "1.0", "0.25",
                                      "--out", str(out)])
    bench_block_sparse.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense xla", "block-sparse xla", "block-sparse xla"]
    assert rows[1]["density"] == 1.0 and 0 < rows[2]["density"] < 1.0
    assert all(r["ms"] > 0 for r in rows)


def test_a_density_outside_the_unit_interval_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import bench_block_sparse

    monkeypatch.setattr(sys, "argv", ["bench_block_sparse", "--quick", "--densities", "1.5"])
    with pytest.raises(ValueError, match="--densities: 1.5 is outside"):
        bench_block_sparse.main()
