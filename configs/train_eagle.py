"""An EAGLE-style feature drafter for SmolLM2-135M-Instruct, trained on its own continuations.

    python -m experiments.run --config configs/train_eagle.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/train_eagle.py:tiny --config.model.path=<folder> \
        --config.workdir=<dir> --config.output_dir=<dir>

1. The self-distillation data of configs/train_medusa.py (same `data` block, same `workdir`:
   written once, shared by every drafter trained on it).
2. One draft layer (started from the target's last layer) over [feature; token embedding]
   is trained with EAGLE's loss (efficient/train/eagle.py), checkpoints in `workdir/eagle`.
3. Held-out one-step top-1 is measured and the drafter is exported (bfloat16) to `output_dir`,
   which `EagleDrafter` / the `spec_eagle` decoder load.
"""

from __future__ import annotations

import ml_collections

from configs import train_medusa, train_target


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = train_medusa.get_config(size)
    c.experiment = "train_eagle"
    del c.heads
    c.drafter = ml_collections.ConfigDict(dict(draft_vocab=64 if tiny else 8192, noise=0.1))
    # batch_size rows x seq_len positions per step: ~0.5 s per step at 8 x 128 on a 2-core CPU.
    c.train = train_target.train_config(
        batch_size=2 if tiny else 8, seq_len=8 if tiny else 128, steps=6 if tiny else 2000,
        peak_lr=1e-3, warmup_steps=1 if tiny else 100, weight_decay=0.0, compute_dtype="float32",
        checkpoint_every=3 if tiny else 250, log_every=2 if tiny else 50,
    )
    c.output_dir = "checkpoints/eagle-smollm2"
    return c
