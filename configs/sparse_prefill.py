"""MInference-style dynamic sparse prefill against dense prefill on the real model.

    python -m experiments.run --config configs/sparse_prefill.py
    python -m experiments.run --config configs/sparse_prefill.py --config.densities='(0.1,)'
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/sparse_prefill.py:tiny

Head patterns are searched once on held-in stdlib files (`calibration_files` of
`calibration_tokens` tokens), for every target density, and written to `patterns_dir` (load them with
efficient.attention.sparse_prefill_search.load_patterns); each context is then measured on
held-out files and retrieval prompts (see experiments/sparse_prefill.py).
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "sparse_prefill"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(path="checkpoints/target" if tiny else "smollm2", tokenizer="auto",
                                             dtype="float32", layer_loop="scan"))
    c.densities = (0.3,) if tiny else (0.1, 0.2, 0.3)  # target mean causal-block density of the search
    c.calibration_tokens = 256 if tiny else 4096  # the first tokens of the longest held-in stdlib files
    c.calibration_files = 1 if tiny else 2
    c.contexts = (256,) if tiny else (4096, 8176)  # 8176 + 16 new tokens fit SmolLM2's 8192
    c.tasks = ("classic_passkey",) if tiny else ("classic_passkey", "kv_prose")
    c.depths = (0.5,) if tiny else (0.1, 0.5, 0.9)
    c.max_new_tokens = 8 if tiny else 12
    c.files = 1 if tiny else 2  # held-out stdlib files scored whole, per context
    c.timing_repeats = 1 if tiny else 3
    c.timing_layer = 15  # whose real queries and keys time one layer's attention
    c.block = 32 if tiny else 64
    c.last_queries = 32 if tiny else 64  # estimate the lines; their query blocks attend densely
    c.min_tokens = 128 if tiny else 1024  # shorter calls prefill densely
    c.patterns_dir = "" if tiny else "checkpoints/minference-smollm2"  # empty: not written
    return c
