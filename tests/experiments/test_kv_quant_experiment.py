"""The KV-quantization experiment runs end to end on a tiny random model: every cache has a
row, the lossless ones match dense, quantized ones are smaller and not better than exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import kv_quant as kv_quant_config
from experiments.common import save_random_model
from experiments.kv_quant import settings_from
from experiments.run import run_experiment


def test_kv_quant_end_to_end(tmp_path: Path) -> None:
    config = kv_quant_config.get_config("tiny")
    config.model.path = str(save_random_model(tmp_path / "model"))
    config.results_dir, config.run_name = str(tmp_path), "smoke"
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["cache"]: r for r in metrics["rows"]}
    assert list(rows) == ["dense", "dense_bf16", "paged", "kivi2", "gear2", "vidkv", "zipcache"]
    assert rows["paged"]["bits_per_byte"] == pytest.approx(rows["dense"]["bits_per_byte"], rel=1e-6)
    assert rows["paged"]["greedy_agrees_with_dense"]
    assert rows["kivi2"]["memory_bytes"] < rows["dense"]["memory_bytes"]
    assert rows["kivi2"]["memory_bytes"] < rows["gear2"]["memory_bytes"]  # GEAR stores its corrections
    assert rows["kivi2"]["bits_per_byte"] != rows["dense"]["bits_per_byte"]  # quantization happened
    assert rows["vidkv"]["memory_bytes"] < rows["kivi2"]["memory_bytes"]
    assert rows["vidkv"]["bits_per_byte"] != rows["dense"]["bits_per_byte"]
    assert rows["zipcache"]["memory_bytes"] < rows["dense"]["memory_bytes"]  # at 64 slots the residual dominates
    assert rows["zipcache"]["bits_per_byte"] != rows["dense"]["bits_per_byte"]
    assert (out / "kv_quant.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_cache_names_are_refused_with_their_key() -> None:
    from experiments.kv_quant import cache_factories

    config = kv_quant_config.get_config("tiny")
    config.caches = "kivi2,nope"
    with pytest.raises(ValueError, match=r"config.caches: unknown \['nope'\]"):
        cache_factories(settings_from(config))
    config.caches, config.vidkv.variants = "", ("vidkv_fast",)
    with pytest.raises(ValueError, match="config.vidkv.variants: unknown 'vidkv_fast'"):
        cache_factories(settings_from(config))
    config.vidkv.variants, config.caches = ("vidkv",), "vidkv"
    assert list(cache_factories(settings_from(config))) == ["dense", "dense_bf16", "vidkv"]
    config.caches, config.zipcache.variants = "", ("zipcache_fast",)
    with pytest.raises(ValueError, match="config.zipcache.variants: unknown 'zipcache_fast'"):
        cache_factories(settings_from(config))


def test_a_chunk_longer_than_the_residual_is_refused_with_its_key() -> None:
    config = kv_quant_config.get_config("tiny")
    config.perplexity.chunk = 64
    with pytest.raises(ValueError, match="config.perplexity.chunk=64"):
        settings_from(config)
