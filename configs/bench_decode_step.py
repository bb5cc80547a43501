"""One-token decode step against a prefilled dense cache, variants interleaved in one process.

    python -m experiments.bench_decode_step --config configs/bench_decode_step.py
    python -m experiments.bench_decode_step --config configs/bench_decode_step.py:tiny   # smoke (tests)

Variants (layer loop / cache storage / decode attention over the [B, K, S, H] cache):
  scan/stacked            layers under lax.scan, the cache as stacked [L, ...] arrays
  unrolled/stacked        a buffer per layer's weights, the stacked cache
  unrolled/per_layer/mat  per-layer cache buffers, always the materialised attention
  unrolled/per_layer      per-layer cache buffers, the default attention choice
                          (blockwise while the cache is at most half full, from 2048 slots)
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.out_dir = "results/bench_decode_step"
    c.run_name = ""  # empty: a timestamp
    c.model = "" if tiny else "smollm2"  # "": the tiny random model below; else a packaged name or path
    c.dtype = "float32"
    c.variants = ("scan/stacked", "unrolled/stacked", "unrolled/per_layer/mat", "unrolled/per_layer")
    # (batch, capacity, tokens held) cells
    c.cells = ((2, 64, 40),) if tiny else (
        (1, 384, 256), (1, 2048, 512), (1, 4224, 256), (1, 4224, 4096), (1, 8192, 4096), (1, 8192, 8000),
        (8, 384, 256))
    c.steps = 2 if tiny else 3  # steps per timed call
    c.repeats = 1 if tiny else 12
    return c
