"""One matmul in float32 and bfloat16, XLA:CPU (jax) against torch, interleaved.

    python -m experiments.bench_cpu_matmul --config configs/bench_cpu_matmul.py
    python -m experiments.bench_cpu_matmul --config configs/bench_cpu_matmul.py:tiny   # smoke (tests)

Why bfloat16 prefill is slower than transformers on CPU: the shapes are SmolLM2's
projections for a 2048-token prefill (tokens x hidden 576 -> 1536).
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.out_dir = "results/bench_cpu_matmul"
    c.run_name = ""  # empty: a timestamp
    c.shapes = ((16, 32, 48),) if tiny else ((2048, 576, 1536), (2048, 1536, 576), (512, 576, 1536))  # (M, K, N)
    c.dtypes = ("float32", "bfloat16")
    c.threads = 2
    c.repeats = 1 if tiny else 9
    c.peer = "transformers"  # "transformers" (torch.matmul) or "none"
    return c
