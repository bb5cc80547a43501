"""Long-context retrieval: needle depth x context length grid on one model.

    python -m experiments.run --config configs/passkey.py
    python -m experiments.run --config configs/passkey.py --config.task=multikey --config.cache=dense_bf16
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/passkey.py:tiny --config.model.path=<folder>

Builds passkey (or multi-key) prompts from held-out stdlib code with the
needle at each depth of each context length, decodes the answer with a
registered decoder through a registered cache, and reports exact-match and
digit accuracy per cell and per context length, whether the issue's target
(exact match >= `target_exact` at every context length) is met, and a
depth x context heatmap. Writes results/passkey/<run_name or timestamp>/.

A context length counts prompt tokens only: prompt + `max_new_tokens` must fit
in the model's max_position_embeddings, so the "2k" point of a 2048-position
model is 2048 - max_new_tokens = 2040.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "passkey"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    # tokenizer: "auto" (the folder's tokenizer.json, else bytes), "byte", or a folder.
    c.model = ml_collections.ConfigDict(dict(path="checkpoints/target", tokenizer="auto", dtype="float32"))
    # The haystack: held-out documents. source: "stdlib" or a folder of text files.
    c.data = ml_collections.ConfigDict(dict(source="stdlib", suffixes=(".py",), split="test"))
    c.task = "passkey"  # "passkey" or "multikey"
    c.num_keys = 4  # multikey only: needles per prompt (4 need contexts of >= 72 byte tokens)
    # Prompt tokens per example; each must be <= max_position_embeddings - max_new_tokens.
    c.contexts = (64, 128) if tiny else (1024, 2040)
    c.depths = (0.25, 0.75) if tiny else (0.1, 0.3, 0.5, 0.7, 0.9)
    c.samples = 1 if tiny else 4  # examples per (context, depth) cell
    c.batch_size = 2 if tiny else 4  # rows per generate call (rows of one context length)
    c.max_new_tokens = 8
    c.cache = "dense"  # a registered cache (efficient/variants.py)
    c.decoder = "greedy"  # a registered decoder that needs nothing from the harness
    c.target_exact = 0.9  # the target: exact match at each context length
    return c
