"""Training EAGLE's feature-level draft model on cached self-distillation data.

    data = load_self_distillation("workdirs/medusa-smollm2/data", target.config)
    run = train_feature_drafter(target, train, held_out, draft_vocab=8192,
                                config=TrainConfig(batch_size=8, seq_len=128, steps=1500), workdir=...)

A stored row holds the target's final-normed features f_i and its chosen tokens
x_{i+1} (`DistillationSet`). The draft model reads the pairs (f_i, x_{i+1}) of a
window with causal attention and predicts f_{i+1} at each one; the loss is
EAGLE's (Li et al. 2024): smooth L1 between predicted and true features plus 0.1
times the cross-entropy between the target's next-token law softmax(E_d f_{i+1})
and the draft's softmax(E_d f^_{i+1}), both over the draft vocabulary E_d. Input
features get uniform noise U(-a, a) (EAGLE's robustness to its own errors).
For teacher-forced rows, pairs where the text left the target's greedy path
carry no target (`follows`): they stay as context but are not trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient.decoding.drafters.eagle_model import FeatureDraftModel
from efficient.decoding.drafters.medusa import frequent_vocab
from efficient.train.config import TrainConfig
from efficient.train.distill import DistillationSet, target_fingerprint
from efficient.train.fit import fit

CLASSIFICATION_WEIGHT = 0.1  # EAGLE's w_cls


@dataclasses.dataclass(frozen=True)
class FeatureDrafterRun:
    model: FeatureDraftModel
    vocab: np.ndarray  # [Vd] draft vocabulary (target ids, most frequent first)
    top1: float  # held out: the draft's argmax over E_d is the target's argmax over E_d, one step ahead
    record: dict[str, Any]


def _windows(data: DistillationSet, config: TrainConfig, step: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.data_seed, step])
    r, n = data.tokens.shape
    rows = rng.integers(r, size=config.batch_size)
    starts = rng.integers(n - config.seq_len + 1, size=config.batch_size)
    window = rows[:, None], starts[:, None] + np.arange(config.seq_len)[None, :]
    return (data.hidden[window].astype(np.float32), data.tokens[window].astype(np.int32),
            data.follows_or_true()[window])


def feature_loss(model: FeatureDraftModel, embed: Callable[[Array], Array], head_weight: Float[Array, "Vd D"],
                 features: Float[Array, "B S D"], tokens: Int[Array, "B S"], follows: Bool[Array, "B S"],
                 noise: Float[Array, "B S D"]) -> tuple[Array, dict[str, Array]]:
    """(smooth L1 + 0.1 cross-entropy, metrics) of predicting f_{i+1} from pairs (f_i, x_{i+1})."""
    b, s, _ = features.shape
    inputs, target = features[:, :-1] + noise[:, :-1], features[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(s - 1, dtype=jnp.int32), (b, s - 1))
    predicted, _ = model(inputs, embed(tokens[:, :-1]), positions=positions)
    weight = follows[:, :-1].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    diff = jnp.abs(predicted - target)
    smooth_l1 = jnp.mean(jnp.where(diff < 1.0, 0.5 * diff**2, diff - 0.5), axis=-1)
    regression = jnp.sum(smooth_l1 * weight) / count
    target_logits = jnp.einsum("bsd,vd->bsv", target, head_weight)
    draft_logits = jnp.einsum("bsd,vd->bsv", predicted, head_weight)
    cross = -jnp.sum(jax.nn.softmax(target_logits, -1) * jax.nn.log_softmax(draft_logits, -1), axis=-1)
    classification = jnp.sum(cross * weight) / count
    hit = jnp.argmax(draft_logits, -1) == jnp.argmax(target_logits, -1)
    top1 = jnp.sum(hit * weight) / count
    return regression + CLASSIFICATION_WEIGHT * classification, {
        "smooth_l1": regression, "cross_entropy": classification, "top1": top1}


def evaluate_feature_drafter(target: Any, model: FeatureDraftModel, vocab: np.ndarray, data: DistillationSet,
                             rows_per_batch: int = 8) -> float:
    """Held-out top-1 one step ahead: the fraction of trained-on positions where the draft's
    argmax over the draft vocabulary is the target's (teacher-forced features, whole rows)."""
    head_weight = jnp.asarray(target.lm_head_rows(jnp.asarray(vocab)), jnp.float32)
    graphdef, params = nnx.split(model)

    @jax.jit
    def hits(params: nnx.State, features: jax.Array, tokens: jax.Array, follows: jax.Array) -> tuple:
        m = nnx.merge(graphdef, params)
        _, metrics = feature_loss(m, target.embed, head_weight, features, tokens, follows,
                                  jnp.zeros_like(features))
        return metrics["top1"], jnp.sum(follows[:, :-1])

    total, count = 0.0, 0
    for start in range(0, data.tokens.shape[0], rows_per_batch):
        sl = slice(start, start + rows_per_batch)
        top1, n = hits(params, jnp.asarray(data.hidden[sl], jnp.float32), jnp.asarray(data.tokens[sl]),
                       jnp.asarray(data.follows_or_true()[sl]))
        total += float(top1) * int(n)
        count += int(n)
    return total / max(count, 1)


def train_feature_drafter(
    target: Any,
    train_data: DistillationSet,
    validation_data: DistillationSet,
    *,
    draft_vocab: int,
    config: TrainConfig,
    workdir: str | Path,
    noise: float = 0.1,
    log: Callable[[str], None] = print,
) -> FeatureDrafterRun:
    """Train a draft model for `target` (its layer starting as the target's last) over a
    `draft_vocab`-token vocabulary, the most frequent of the training tokens; resumes from
    `workdir`'s latest checkpoint."""
    model_config = target.config
    if config.seq_len < 2 or config.seq_len > train_data.tokens.shape[1]:
        raise ValueError(f"TrainConfig.seq_len must be in [2, {train_data.tokens.shape[1]}] (positions stored "
                         f"per row), got {config.seq_len}")
    if not 0 <= noise < 10:
        raise ValueError(f"noise must be in [0, 10), got {noise!r}")
    vocab = frequent_vocab(train_data.tokens, draft_vocab, model_config.vocab_size)
    head_weight = jnp.asarray(target.lm_head_rows(jnp.asarray(vocab)), jnp.float32)
    graphdef, params = nnx.split(FeatureDraftModel.create(target, rngs=nnx.Rngs(config.data_seed)))

    def loss(params: nnx.State, features: Array, tokens: Array, follows: Array, key: Array) -> tuple:
        uniform = jax.random.uniform(key, features.shape, minval=-noise, maxval=noise)
        return feature_loss(nnx.merge(graphdef, params), target.embed, head_weight, features, tokens, follows,
                            uniform)

    def draw(step: int) -> tuple:
        features, tokens, follows = _windows(train_data, config, step)
        return (jnp.asarray(features), jnp.asarray(tokens), jnp.asarray(follows),
                jax.random.fold_in(jax.random.key(config.data_seed), step))

    result = fit(params, loss, draw, config, workdir, log)
    model = nnx.merge(graphdef, result.params)
    top1 = evaluate_feature_drafter(target, model, vocab, validation_data)
    record = {
        "target": target_fingerprint(model_config), "draft_vocab": draft_vocab, "noise": noise,
        "train_config": config.to_dict(), "train_positions": train_data.num_positions,
        "validation_positions": validation_data.num_positions, "steps": result.steps,
        "final_train_loss": result.final_loss, "wall_time_s": result.seconds, "top1": top1,
    }
    return FeatureDrafterRun(model=model, vocab=vocab, top1=top1, record=record)
