"""Attention benchmark: prefill TFLOP/s and decode GB/s of every implementation side by side.

Run (full sizes, on a GPU or TPU):
    python experiments/bench_attention.py --config=configs/bench_attention.py
Tiny smoke size (CPU; Pallas TPU kernels interpreted):
    python experiments/bench_attention.py --config=configs/bench_attention.py:tiny \
        --config.out_dir=/tmp/bench
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "full") -> ml_collections.ConfigDict:
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.run_name = ""  # empty: a timestamp
    c.out_dir = "results/bench_attention"
    c.dtype = "float32" if tiny else "bfloat16"
    c.batch = 1 if tiny else 4
    c.num_heads = 2 if tiny else 32
    c.num_kv_heads = 1 if tiny else 8
    c.head_dim = 64 if tiny else 128
    c.causal = True
    c.backward = True
    c.prefill_lengths = (128,) if tiny else (512, 1024, 2048, 4096, 8192)
    c.decode_batch = 2 if tiny else 16
    c.decode_lengths = (256,) if tiny else (1024, 4096, 16384, 65536)
    # Names: dispatcher implementations, then peers from jax.experimental.pallas.ops.
    c.implementations = (
        "xla", "pallas_tpu", "cudnn", "jax_ops_tpu_flash", "jax_ops_gpu_mha", "jax_ops_gpu_decode",
    )
    c.warmup = 1 if tiny else 3
    c.iters = 2 if tiny else 20
    c.copy_mib = 8 if tiny else 1024
    return c
