"""Generation benchmark: prefill and decode tokens/s, and the decode-loop overhead.

Run:
    python -m experiments.bench_generate --config configs/bench_generate.py
On the real model (SmolLM2-135M-Instruct):
    python -m experiments.bench_generate --config configs/bench_generate.py --config.model_path=smollm2
Tiny smoke size:
    python -m experiments.bench_generate --config configs/bench_generate.py:tiny --config.out_dir=/tmp/b
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "full") -> ml_collections.ConfigDict:
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.out_dir = "results/bench_generate"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    c.dtype = "float32"
    # model_path: "" for the random model below, or a packaged name ("smollm2"), .gguf file or HF folder.
    c.model_path = ""
    # A ~58M-parameter Llama-style random model (32k vocabulary, GQA 8:4).
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=512 if tiny else 32000, hidden_size=64 if tiny else 512,
        intermediate_size=128 if tiny else 1536, num_layers=2 if tiny else 8,
        num_heads=4 if tiny else 8, num_kv_heads=2 if tiny else 4, head_dim=16 if tiny else 64,
    ))
    c.batch_sizes = (2,) if tiny else (1, 8)
    c.prompt_length = 32 if tiny else 256
    c.new_tokens = 64 if tiny else 128
    # "scan" (stacked layers, compile flat in depth), "unrolled" (a buffer per layer: XLA:CPU
    # copies a stacked layer's weights before each dot) or "auto" (unrolled on CPU).
    c.layer_loop = "scan"
    c.warmup = 1
    c.iters = 1 if tiny else 5
    c.lock()
    return c
