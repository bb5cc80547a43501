"""The embedded default drafter: ~12x smaller than the target, same byte tokenizer.

    python -m experiments.train --config configs/train_draft.py
    python -m experiments.train --config configs/train_draft.py --config.train.steps=500

Exports bf16 safetensors to `checkpoints/draft/`; orbax checkpoints go to
`workdirs/draft/` (resumed).
"""

from __future__ import annotations

import ml_collections

from configs import train_target


def get_config() -> ml_collections.ConfigDict:
    config = train_target.get_config()
    config.name = "draft"
    config.model = train_target.model_config(
        hidden_size=128,  # D
        intermediate_size=512,  # F
        num_layers=4,  # L
        num_heads=4,  # N
        num_kv_heads=2,  # K
        head_dim=32,  # H
    )
    # ~2,400 tok/s at 8x512 in bf16 on a 2-core CPU: 2000 steps (~8M tokens) in about an hour.
    config.train = train_target.train_config(peak_lr=2e-3, steps=2000, warmup_steps=100, eval_every=250,
                                             checkpoint_every=100)
    config.output_dir = "checkpoints/draft"
    config.workdir = "workdirs/draft"
    return config
