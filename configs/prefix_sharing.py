"""N requests behind one shared system prompt: dense vs paged cache with prefix sharing.

    python -m experiments.run --config configs/prefix_sharing.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/prefix_sharing.py:tiny --config.model.path=<folder>
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "prefix_sharing"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32"))
    c.system_tokens = 40 if tiny else 1024
    c.suffix_tokens = 8 if tiny else 32
    c.requests = (1, 2) if tiny else (1, 2, 4, 8)
    c.page_size = 8 if tiny else 16
    return c
