"""The model, its caches and sequence-parallel attention on a mesh of simulated CPU devices.

    python -m experiments.run --config configs/sharded.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/sharded.py:tiny

On this machine the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count,
set by the experiment before jax starts): step times show correctness and overheads, not
speed. Measured per mesh shape (data x model): greedy tokens and logits against one
device, per-device parameter and cache memory, prefill and decode step times, the decode
step's collectives; and ring attention against DeepSpeed-Ulysses: communication volume
from the compiled HLO and per-device temporary memory against the sequence axis size.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "sharded"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    c.devices = 8  # simulated CPU devices (a real accelerator host uses its own)
    c.model = ml_collections.ConfigDict(dict(path="checkpoints/target" if tiny else "smollm2", dtype="float32"))
    # (data, model) mesh shapes; the sequence axis is measured by the attention part.
    c.meshes = ((8, 1), (4, 2), (2, 4), (1, 8))
    c.rules = "megatron"  # or "fsdp": parameters also split along the model dimension over "data"
    c.batch = 8
    c.prompt_tokens = 32 if tiny else 128
    c.new_tokens = 8 if tiny else 16
    c.timing_repeats = 3 if tiny else 5
    # Sequence-parallel attention: [B, T, N, H] with K KV heads, split over a sequence axis of each size.
    c.attention = ml_collections.ConfigDict(dict(
        sequence=256 if tiny else 4096, heads=8 if tiny else 16, kv_heads=2 if tiny else 4,
        head_dim=16 if tiny else 64, axis_sizes=(1, 2, 4, 8)))
    return c
