"""Bits/byte of the same text given more and more context (does the model use it?).

    python -m experiments.run --config configs/long_context.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/long_context.py:tiny --config.model.path=<folder>

The longest held-out stdlib files (one document each) are read up to max(contexts)
tokens; the last `tail` tokens are scored at every context length.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "long_context"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32"))
    c.data = ml_collections.ConfigDict(dict(source="stdlib", suffixes=(".py",), split="test"))
    c.contexts = (16, 32, 64) if tiny else (512, 1024, 2048, 4096, 8191)  # 8191 + 1 = SmolLM2's 8192 positions
    c.tail = 16 if tiny else 512
    c.files = 2 if tiny else 4
    return c
