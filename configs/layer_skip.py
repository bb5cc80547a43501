"""Layer-skip (SWIFT) calibration on held-out text, traced size by size.

    python -m experiments.run --config configs/layer_skip.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/layer_skip.py:tiny --config.model.path=<folder>
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "layer_skip"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32"))
    c.data = ml_collections.ConfigDict(dict(source="stdlib", suffixes=(".py",), split="validation"))
    # The speculative benchmark's calibration: rows x tokens of held-out text, drafts of `length`.
    c.calibration = ml_collections.ConfigDict(dict(rows=2, tokens=32 if tiny else 256, length=4, width=6,
                                                   patience=2))
    return c
