"""Gemma 3's hybrid cache (ring buffers for the local layers) against the dense cache.

    python -m experiments.run --config configs/hybrid_cache.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/hybrid_cache.py:tiny

The default model has Gemma 3 1B's attention geometry (26 layers, 5 local : 1 global,
window 512, 1 KV head of size 256, 4 query heads) with a narrow residual stream (256)
and random weights, so its KV memory is Gemma 3 1B's and a CPU decodes it quickly.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "hybrid_cache"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=512, hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
        num_hidden_layers=2 if tiny else 26, sliding_window_pattern=2 if tiny else 6, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16 if tiny else 256, query_pre_attn_scalar=16 if tiny else 256,
        sliding_window=8 if tiny else 512, max_position_embeddings=256 if tiny else 32768,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6))
    c.contexts = (16, 48) if tiny else (1024, 4096, 8192)
    c.steps = 2 if tiny else 16
    c.max_step = 4 if tiny else 128  # tokens one forward may append (the ring holds window + max_step - 1)
    c.seed = 0
    return c
