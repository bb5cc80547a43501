"""Long-context retrieval: needle depth x context length grid per task, on the real model.

    python -m experiments.run --config configs/passkey.py
    python -m experiments.run --config configs/passkey.py --config.model.backend=transformers
    python -m experiments.run --config configs/passkey.py --config.tasks='("kv_prose",)' --config.num_keys=3
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/passkey.py:tiny --config.model.path=<folder>

Default: SmolLM2-135M-Instruct (the packaged GGUF file, `model.path="smollm2"`)
on two tasks of `efficient.data.tasks`: `classic_passkey` (Mohtashami & Jaggi
2023: grass/sky/sun filler, "The pass key is N. Remember it.") and `kv_prose`
(`KEY-dddd: ddddd` lines inside English prose, asked with a final `KEY-dddd:`
line). Each prompt has its needle at each depth of each context length; a
registered decoder through a registered cache (or transformers, with
`model.backend="transformers"`) writes the answer; reported per task:
exact-match and digit accuracy per cell and per context length, whether the
target (exact match >= `target_exact` at every context length) is met, and a
depth x context heatmap. Writes results/passkey/<run_name or timestamp>/.

Baseline (SmolLM2-135M-Instruct, transformers float32 greedy, 2 samples x 5 depths,
1 at 8k; results/passkey/final_transformers and final_kv_prose_1key): exact match at
1k/2k/4k/8k: classic_passkey 1.0/1.0/1.0/1.0; kv_prose (1 key) 1.0/1.0/0.9/0.4;
kv_prose (5 keys) 0.9/0.9/0.7/0.4.

A context length counts prompt tokens only: prompt + `max_new_tokens` must fit
in the model's max_position_embeddings, so the "8k" point of the 8192-position
model is 8192 - max_new_tokens = 8184.
On a shared 2-core CPU the default grid took 8-13 minutes per task with
transformers (an 8k-token forward: 35-90 s); `--config.samples='(1,1,1,1)'`
or fewer contexts give a quicker look.
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
    # path: a packaged model's name ("smollm2"), an HF checkpoint folder or a .gguf file.
    # tokenizer: "auto" (the checkpoint's own, else bytes), "byte", or a folder.
    # backend: "efficient" (our JAX model) or "transformers" (the reference, torch on CPU).
    c.model = ml_collections.ConfigDict(dict(path="checkpoints/target" if tiny else "smollm2", tokenizer="auto",
                                             dtype="float32", backend="efficient", torch_threads=2))
    # The haystack. source: "default" (each task's own filler: held-out stdlib code for passkey and
    # multikey, prose for kv_prose, grass/sky/sun for classic_passkey), "stdlib", or a folder of text files.
    c.data = ml_collections.ConfigDict(dict(source="default", suffixes=(".py",), split="test"))
    c.tasks = ("classic_passkey", "kv_prose")  # names in efficient.data.TASKS
    # multikey / kv_prose: needles per prompt; 0: the task's default (kv_prose: 5). The baseline uses 1:
    # with distractor keys SmolLM2-135M copies a nearby key's value at 4k-8k (see efficient.data.tasks).
    c.num_keys = 1
    c.kv_style = "quiz"  # kv_prose: a wording in efficient.data.tasks.KV_STYLES
    # Prompt tokens per example; each must be <= max_position_embeddings - max_new_tokens.
    c.contexts = (320, 448) if tiny else (1024, 2048, 4096, 8184)
    c.depths = (0.25, 0.75) if tiny else (0.1, 0.3, 0.5, 0.7, 0.9)
    # Examples per (context, depth) cell: one int, or one per context length.
    c.samples = 1 if tiny else (2, 2, 2, 1)
    c.batch_size = 2 if tiny else 1  # rows per generate call (rows of one context length)
    c.max_new_tokens = 8
    c.cache = "dense"  # a registered cache (efficient/variants.py); backend "efficient" only
    c.decoder = "greedy"  # a registered decoder that needs nothing from the harness; backend "efficient" only
    c.target_exact = 0.9  # exact match at each context length
    return c
