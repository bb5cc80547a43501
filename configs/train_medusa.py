"""Medusa-1 heads for SmolLM2-135M-Instruct, trained on its own continuations (self-distillation).

    python -m experiments.run --config configs/train_medusa.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/train_medusa.py:tiny --config.model.path=<folder> \
        --config.workdir=<dir> --config.output_dir=<dir>

1. The target greedily continues `data.prompts` held-in stdlib prompts (train split) and its
   final-normed hidden states are cached on disk (`workdir/data`, resumed part by part).
2. `num_heads` heads are trained over a `draft_vocab`-token vocabulary with AdamW, checkpoints
   in `workdir` (resumed); the last `data.validation_rows` rows are held out.
3. Held-out accuracy by head and rank is measured and the heads are exported (bfloat16) with it
   to `output_dir`, which `MedusaDrafter` / the `spec_medusa` decoder load.
"""

from __future__ import annotations

import ml_collections

from configs import train_target


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "train_medusa"
    c.results_dir = "results"
    c.run_name = ""
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32"))
    # prompts: held-in prompts of prompt_tokens tokens, each from a different document at a seeded
    # line, prompts_per_seed per seed (seeds 1, 2, ...: 582 train documents hold 128 tokens);
    # batch_size prompts are continued together and stored as one part. teacher_windows: windows of
    # new_tokens tokens of held-in text run through the target once (workdir/teacher), labelled where
    # the text follows the greedy path (efficient/train/distill.py); 0: none. heldout_prompts: prompts
    # from validation-split documents whose continuations measure the accuracy the tree is built from.
    c.data = ml_collections.ConfigDict(dict(
        source="stdlib", suffixes=(".py",), prompts=8 if tiny else 768, prompts_per_seed=512,
        prompt_tokens=16 if tiny else 128,
        new_tokens=16 if tiny else 128, batch_size=4 if tiny else 32, validation_rows=4 if tiny else 64,
        teacher_windows=8 if tiny else 3072, heldout_prompts=4 if tiny else 64,
    ))
    c.heads = ml_collections.ConfigDict(dict(num_heads=3 if tiny else 4, draft_vocab=64 if tiny else 8192,
                                             ranks=4 if tiny else 8))
    # batch_size rows x seq_len positions per step. ~0.5 s per step at 16 x 64 on a 2-core CPU.
    c.train = train_target.train_config(
        batch_size=2 if tiny else 16, seq_len=8 if tiny else 64, steps=6 if tiny else 1000,
        peak_lr=1e-3, warmup_steps=1 if tiny else 100, weight_decay=0.0, compute_dtype="float32",
        checkpoint_every=3 if tiny else 250, log_every=2 if tiny else 50,
    )
    c.workdir = "workdirs/medusa-smollm2"
    c.output_dir = "checkpoints/medusa-smollm2"
    return c
