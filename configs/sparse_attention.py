"""Query-aware sparse decoding (Quest) against dense attention on the real model.

    python -m experiments.run --config configs/sparse_attention.py
    python -m experiments.run --config configs/sparse_attention.py --config.contexts='(2048,4096)'
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/sparse_attention.py:tiny

Every example is prefilled once, densely, and decoded from a copy of that cache by each
method (dense, and Quest reading `fractions` of the pages; see experiments/sparse_attention.py).
On this 2-core CPU the default took about 15 minutes, mostly 8k-token prefills.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "sparse_attention"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    # layer_loop: "scan" keeps one compile per shape cheap; the whole-step timing always runs unrolled on CPU.
    c.model = ml_collections.ConfigDict(dict(path="checkpoints/target" if tiny else "smollm2", tokenizer="auto",
                                             dtype="float32", layer_loop="scan"))
    # Prompt tokens per example (multiples of the 16-slot page); 8176 + 16 new tokens fit SmolLM2's 8192.
    c.contexts = (320, 448) if tiny else (2048, 4096, 8176)
    c.fractions = (0.25, 0.125) if tiny else (0.25, 0.125, 0.0625)  # of the pages, read per decode step
    c.paper_fractions = () if tiny else (0.125,)  # Quest's own rule, without the always-read sink page
    c.head_fractions = () if tiny else (0.125,)  # each query head reads its own pages (3x the reads)
    c.tasks = ("classic_passkey",) if tiny else ("classic_passkey", "kv_prose")
    c.depths = (0.5,) if tiny else (0.1, 0.3, 0.5, 0.7, 0.9)
    c.max_new_tokens = 16 if tiny else 12
    c.files = 1 if tiny else 2  # long held-out stdlib files for bits/byte (0: skip)
    c.tail = 8 if tiny else 64  # tokens scored by one-token steps at the end of each file
    c.timing_repeats = 3 if tiny else 9
    c.step_contexts = () if tiny else (8176,)  # whole decode step timing (compiles the unrolled model)
    return c
