"""The embedded default target: a byte-level Llama-style model (~12.7M params, context 2048).

    python -m experiments.train --config configs/train_target.py
    python -m experiments.train --config configs/train_target.py --config.train.steps=200 \
        --workdir=workdirs/target_try

Trains on the Python standard library (train split by module), validates in
bits/byte on the validation split, and exports bf16 safetensors to
`checkpoints/target/`; orbax checkpoints go to `workdirs/target/` (resumed).
"""

from __future__ import annotations

import ml_collections


def model_config(**overrides: object) -> ml_collections.ConfigDict:
    """Fields of `efficient.models.ModelConfig` (vocab 259 = ByteTokenizer)."""
    cfg = ml_collections.ConfigDict(dict(
        vocab_size=259,
        hidden_size=384,  # D
        intermediate_size=1024,  # F
        num_layers=8,  # L
        num_heads=6,  # N
        num_kv_heads=2,  # K (GQA, G=3)
        head_dim=64,  # H
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
    ))
    cfg.update(overrides)
    return cfg


def train_config(**overrides: object) -> ml_collections.ConfigDict:
    """Fields of `efficient.train.TrainConfig`."""
    cfg = ml_collections.ConfigDict(dict(
        batch_size=8,
        microbatches=1,  # raise (2, 4, 8) when 8 x seq_len does not fit in memory
        # 512 on CPU (2 cores: ~785 tok/s in bf16 at 8x512, ~80 tok/s at 8x2048 with
        # microbatches=4, which 8x2048 needs: ~30 GB otherwise); 2048 on an accelerator.
        seq_len=512,
        steps=600,  # ~60 min on a 2-core CPU at 8x512 in bf16 (~2.5M tokens)
        peak_lr=1e-3,
        warmup_steps=50,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        grad_clip_norm=1.0,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        compute_dtype="bfloat16",  # params and optimizer state stay float32
        eval_every=100,
        eval_batch_size=8,
        eval_max_windows=32,
        checkpoint_every=50,
        keep_checkpoints=2,
        log_every=10,
        seed=0,
        data_seed=0,
    ))
    cfg.update(overrides)
    return cfg


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "target"
    config.model = model_config()
    config.train = train_config()
    # source: "stdlib" or a folder of text files; suffixes filter a folder (None: all files).
    config.data = ml_collections.ConfigDict(dict(source="stdlib", suffixes=(".py",), tokenizer="byte"))
    config.output_dir = "checkpoints/target"
    config.workdir = "workdirs/target"
    # Devices: data parallel over `data`, tensor parallel over `model` (rules: "megatron", or "fsdp"
    # to split parameters and optimizer state over `data` too); 1 x 1 trains on one device.
    config.mesh = ml_collections.ConfigDict(dict(data=1, model=1, rules="megatron"))
    return config
