"""AdamW with linear warmup, cosine decay to a floor, and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from efficient.train.config import TrainConfig


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """0 -> peak_lr linearly over warmup_steps, then cosine to peak_lr * min_lr_ratio at steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.peak_lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.peak_lr * config.min_lr_ratio,
    )


def _decay_mask(params: object) -> object:
    """Weight decay on matrices (kernels, embeddings) only, not on norms or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm (if grad_clip_norm > 0), then AdamW on the schedule."""
    adamw = optax.adamw(
        learning_rate=lr_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw
