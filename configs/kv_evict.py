"""Evicting KV caches (StreamingLLM, H2O, TOVA, SnapKV) on SmolLM2-135M-Instruct: bits/byte
and retrieval against the kept fraction (question-aware and question-agnostic), StreamingLLM's
sinks claim, and memory and decode step time against the context length.

    python -m experiments.run --config configs/kv_evict.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/kv_evict.py:tiny --config.model.path=<folder>
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "kv_evict"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32"))
    # policies: the presses streaming_llm, h2o, tova, snapkv (efficient/cache/press.py); pyramidkv
    # (snapkv with budgets falling with depth); razor and needle_heads (retrieval heads keep every
    # token, found by calibration: experiments/kv_evict.py).
    c.presses = ("h2o", "needle_heads") if tiny else ("streaming_llm", "h2o", "tova", "snapkv", "pyramidkv", "razor",
                                                      "needle_heads")
    c.kept = (0.25,) if tiny else (0.5, 0.25, 0.125)  # of each window's tokens
    c.perplexity = ml_collections.ConfigDict(dict(seq_len=64 if tiny else 1024, max_windows=2 if tiny else 4,
                                                  batch_size=2 if tiny else 4, chunk=16 if tiny else 32))
    # StreamingLLM's claim: windows of seq_len tokens (4x this budget), window-only vs 4 sinks + window.
    c.streaming = ml_collections.ConfigDict(dict(budget=16 if tiny else 256))
    # kv_prose ("quiz" wording, 5 KEY lines): the dense model's retrieval task at 1k-2k tokens.
    c.retrieval = ml_collections.ConfigDict(dict(
        context_tokens=320 if tiny else 1024, depths=(0.5,) if tiny else (0.1, 0.3, 0.5, 0.7, 0.9),
        samples=1 if tiny else 2, kept=(0.25,) if tiny else (0.5, 0.25, 0.125), new_tokens=4 if tiny else 8))
    c.speed = ml_collections.ConfigDict(dict(contexts=(32,) if tiny else (1024, 4096, 8192),
                                             budget=16 if tiny else 256))
    # Calibration of the retrieval-head policies: tokens per sequence (random tokens repeated
    # twice for razor; kv_prose prompts of another seed than the evaluation's for needle_heads).
    c.calibration = ml_collections.ConfigDict(dict(tokens=320 if tiny else 1024))
    return c
