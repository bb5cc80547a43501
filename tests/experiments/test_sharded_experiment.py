"""The sharding experiment runs end to end at a smoke size on 8 simulated devices: every
mesh reproduces one device's greedy tokens, each device holds its share of parameters and
cache, and ring attention sends less per device than the whole sequence's keys."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from configs import sharded as sharded_config
from experiments.run import run_experiment
from efficient.parallel.hlo import hlo_collectives


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8 simulated devices tests/conftest.py sets up")
def test_sharded_end_to_end(tmp_path: Path) -> None:
    config = sharded_config.get_config("tiny")
    config.results_dir, config.run_name = str(tmp_path), "smoke"
    config.meshes, config.attention.axis_sizes, config.timing_repeats = ((4, 2),), (1, 4), 1
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    (row,) = metrics["meshes"]
    assert row["tokens_equal"] and row["max_logit_diff"] < 1e-4
    assert row["param_share"] < 1.5  # 6 heads, 2 KV heads, 1024 MLP units split 2 ways; byte vocab 259 is not
    assert row["cache_share"] == pytest.approx(1.0, abs=0.01)  # batch 8 over 4, KV heads 2 over 2: an eighth each (positions split by batch only)
    assert row["largest_all_gather_bytes"] < row["layer_cache_bytes"] / 8
    assert row["collectives"]["all-reduce"] > 0  # row-parallel o_proj / down_proj
    methods = {(r["method"], r["devices"]): r for r in metrics["attention"]}
    assert set(methods) == {("ring", 1), ("ulysses", 1), ("ring", 4), ("ulysses", 4)}
    assert methods[("ring", 1)]["sent_mib"] == 0.0
    assert 0.0 < methods[("ring", 4)]["sent_mib"] and 0.0 < methods[("ulysses", 4)]["sent_mib"]
    for method in ("ring", "ulysses"):  # each device holds about a quarter
        assert methods[(method, 4)]["memory_mib"] < 0.5 * methods[(method, 1)]["memory_mib"]
    assert (out / "sharded.png").read_bytes()[:4] == b"\x89PNG"


def test_hlo_collectives_reads_counts_and_sizes() -> None:
    hlo = ("  %a = f32[4,8]{1,0} all-gather(f32[1,8]{1,0} %x), replica_groups={}\n"
           "  %b = (f32[16]{0}, f32[16]{0}) all-reduce-start(f32[16]{0} %y)\n"
           "  %c = s32[2]{0} collective-permute(s32[2]{0} %z)\n"
           "  %d = (f32[1,2]{1,0}, f32[1,2]{1,0}, /*index=2*/f32[1,2]{1,0}) all-to-all(%p, %q, %r)\n"
           "  ROOT %e = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %w)\n"
           "  %f = f32[8]{0} get-tuple-element(%all-to-all), index=0\n")
    found = hlo_collectives(hlo)
    assert found["counts"]["all-gather"] == 2 and found["bytes"]["all-gather"] == [128, 32]
    assert found["counts"]["all-reduce"] == 1 and found["bytes"]["all-reduce"] == [128]
    assert found["bytes"]["collective-permute"] == [8]
    assert found["counts"]["all-to-all"] == 1 and found["bytes"]["all-to-all"] == [24]
