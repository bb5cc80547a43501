"""Speed side by side with transformers on the same weights (SmolLM2-135M-Instruct by default).

    python -m experiments.bench_peer --config configs/bench_peer.py
    python -m experiments.bench_peer --config configs/bench_peer.py:full   # the whole grid (hours on 2 cores)
    python -m experiments.bench_peer --config configs/bench_peer.py:tiny   # smoke (tests)

Both sides load the same GGUF file (transformers through its GGUF reader, which
needs `gguf` and `accelerate`), use the same prompts (held-out stdlib text) and
the same number of threads; repetitions are interleaved and medians reported.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "full", "tiny"):
        raise ValueError(f"config variant must be 'default', 'full' or 'tiny', got {size!r}")
    c = ml_collections.ConfigDict()
    c.run_name = ""  # empty: a timestamp
    c.out_dir = "results/bench_peer"
    c.model = "smollm2"  # a packaged name, a .gguf file (both sides) or an HF folder (both sides)
    c.dtypes = ("float32", "bfloat16")
    c.threads = 2
    c.repeats = 3
    c.new_tokens = 128
    # (batch, prompt tokens) cells; prefill is timed on the prefill cells, decode on the decode cells.
    if size == "full":
        c.prefill = ((1, 512), (1, 2048), (1, 8192), (8, 512), (8, 2048), (8, 8192))
        c.decode = ((1, 256), (1, 4096), (8, 256), (8, 4096))
    elif size == "tiny":
        c.prefill = ((1, 32),)
        c.decode = ((1, 16),)
        c.new_tokens = 4
        c.repeats = 1
        c.dtypes = ("float32",)
    else:
        c.prefill = ((1, 512), (1, 2048), (1, 4096), (8, 512))
        c.decode = ((1, 256), (1, 4096), (8, 256))
        c.repeats = 2
    c.measure_rss = size != "tiny"  # two extra subprocesses
    c.peer = "transformers"  # "transformers" or "none" (ours only)
    # ours: "scan" over stacked layers, "unrolled" (one buffer per layer: XLA:CPU copies a
    # stacked layer's weights before each dot), "auto" (unrolled on CPU); also_layer_loop
    # runs a second of ours with another loop, interleaved ("" for none).
    c.layer_loop = "auto"
    c.also_layer_loop = ""
    return c
