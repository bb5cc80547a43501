"""Training Medusa-1 heads on cached self-distillation data (optax AdamW, orbax checkpoints, resume).

    data = load_self_distillation("workdirs/medusa-smollm2/data", target.config)
    run = train_medusa(target, data, num_heads=4, draft_vocab=8192,
                       config=TrainConfig(batch_size=16, seq_len=64, steps=600), workdir="workdirs/medusa-smollm2")

Each step draws `batch_size` rows x `seq_len` consecutive positions of the
stored hidden states (a function of (data_seed, step), so a resumed run sees
the batches an uninterrupted one would); head k's label at position i is the
target's token i + k, as an index into the draft vocabulary (labels outside it
are not trained on, and count as misses in evaluation). The loss is the sum
over heads of the mean cross-entropy (Medusa-1: the target stays frozen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from efficient.decoding.drafters.medusa import MedusaHeads, frequent_vocab
from efficient.train.config import TrainConfig
from efficient.train.distill import DistillationSet, target_fingerprint
from efficient.train.fit import fit


@dataclasses.dataclass(frozen=True)
class MedusaRun:
    heads: MedusaHeads
    accuracy: np.ndarray  # [K, R]: P(head k's rank-r candidate is the target's token), held out
    coverage: float  # fraction of held-out labels inside the draft vocabulary
    record: dict[str, Any]


def label_indices(tokens: Int[np.ndarray, "R N"], num_heads: int, vocab: np.ndarray,
                  vocab_size: int, follows: np.ndarray | None = None) -> Int[np.ndarray, "R N K"]:
    """Head k's label at position i: the draft-vocabulary index of tokens[i + k] (k = 1..K);
    -1 past the row's end, where the greedy path is left before i + k (`follows[i..i+k-1]`
    not all true), or outside the draft vocabulary (-2: a miss that is not trained on but
    counts in evaluation)."""
    index_of = np.full((vocab_size,), -2, np.int32)
    index_of[np.asarray(vocab)] = np.arange(len(vocab), dtype=np.int32)
    r, n = tokens.shape
    on_path = np.ones((r, n), bool)
    labels = np.full((r, n, num_heads), -1, np.int32)
    for k in range(1, num_heads + 1):
        if follows is not None:
            on_path[:, : n - k] &= follows[:, k - 1: n - 1]
        labels[:, : n - k, k - 1] = np.where(on_path[:, : n - k], index_of[tokens[:, k:]], -1)
    return labels


def medusa_loss(params: dict[str, Array], vocab: Array, head_weight: Float[Array, "Vd D"],
                hidden: Float[Array, "B S D"], labels: Int[Array, "B S K"]) -> tuple[Array, Array]:
    """(summed per-head mean cross-entropy, per-head top-1 accuracy on trained labels)."""
    heads = MedusaHeads(weight=params["weight"], bias=params["bias"], vocab=vocab)
    logits = heads.logits(hidden, head_weight)  # B S K Vd
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = labels >= 0  # -1: no label; -2: outside the draft vocabulary (not trainable)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(valid, axis=(0, 1)), 1)
    nll = -jnp.sum(jnp.where(valid, picked, 0.0), axis=(0, 1)) / count  # K
    hit = (jnp.argmax(logits, axis=-1) == labels) & valid
    return jnp.sum(nll), jnp.sum(hit, axis=(0, 1)) / count


def rank_accuracy(heads: MedusaHeads, head_weight: Float[Array, "Vd D"], hidden: np.ndarray,
                  labels: np.ndarray, ranks: int, chunk: int = 1024) -> np.ndarray:
    """[K, ranks]: the fraction of positions (with a next-k token) where head k's rank-r
    candidate is the target's token; labels outside the draft vocabulary are misses."""
    k = heads.num_heads
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_l = labels.reshape(-1, k)

    @jax.jit
    def ranked(h: jax.Array) -> jax.Array:
        return jax.lax.top_k(heads.logits(h, head_weight), ranks)[1]  # C K R

    hits = np.zeros((k, ranks))
    present = np.zeros((k,))
    for start in range(0, flat_h.shape[0], chunk):
        h = np.asarray(flat_h[start:start + chunk], np.float32)
        lab = flat_l[start:start + chunk]
        top = np.asarray(ranked(jnp.asarray(h)))
        exists = lab != -1  # -2 (outside the draft vocabulary) is a position, and a miss
        hits += np.sum((top == lab[:, :, None]) & exists[:, :, None], axis=0)
        present += np.sum(exists, axis=0)
    return hits / np.maximum(present, 1)[:, None]


def evaluate_heads(target: Any, heads: MedusaHeads, data: DistillationSet, ranks: int) -> tuple[np.ndarray, float]:
    """(accuracy [K, ranks] as `rank_accuracy`, coverage: the fraction of head 1's labels inside
    the draft vocabulary) of `heads` on `data`."""
    vocab_size = target.config.vocab_size
    labels = label_indices(data.tokens, heads.num_heads, np.asarray(heads.vocab), vocab_size, data.follows)
    accuracy = rank_accuracy(heads, jnp.asarray(target.lm_head_rows(heads.vocab), jnp.float32), data.hidden,
                             labels, ranks)
    first = labels[..., 0][labels[..., 0] != -1]
    return accuracy, float(np.mean(first >= 0))


def _batch(data: DistillationSet, labels: np.ndarray, config: TrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.data_seed, step])
    r, n = data.tokens.shape
    rows = rng.integers(r, size=config.batch_size)
    starts = rng.integers(n - config.seq_len + 1, size=config.batch_size)
    window = starts[:, None] + np.arange(config.seq_len)[None, :]
    return (data.hidden[rows[:, None], window].astype(np.float32), labels[rows[:, None], window])


def train_medusa(
    target: Any,
    train_data: DistillationSet,
    validation_data: DistillationSet,
    *,
    num_heads: int,
    draft_vocab: int,
    config: TrainConfig,
    workdir: str | Path,
    ranks: int = 8,
    log: Callable[[str], None] = print,
) -> MedusaRun:
    """Train `num_heads` heads over a `draft_vocab`-token vocabulary (the most frequent of
    the training continuations); resumes from `workdir`'s latest checkpoint."""
    model_config = target.config
    if config.seq_len > train_data.tokens.shape[1]:
        raise ValueError(f"TrainConfig.seq_len {config.seq_len} exceeds the {train_data.tokens.shape[1]} "
                         "positions stored per row")
    vocab = frequent_vocab(train_data.tokens, draft_vocab, model_config.vocab_size)
    heads0 = MedusaHeads.init(num_heads, model_config.hidden_size, vocab)
    head_weight = jnp.asarray(target.lm_head_rows(heads0.vocab), jnp.float32)
    labels = label_indices(train_data.tokens, num_heads, vocab, model_config.vocab_size, train_data.follows)
    params = {"weight": heads0.weight, "bias": heads0.bias}

    def loss(params: dict[str, Array], hidden: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
        value, top1 = medusa_loss(params, heads0.vocab, head_weight, hidden, labels)
        return value, {"top-1 by head": top1}

    def draw(step: int) -> tuple[jax.Array, jax.Array]:
        hidden, lab = _batch(train_data, labels, config, step)
        return jnp.asarray(hidden), jnp.asarray(lab)

    result = fit(params, loss, draw, config, workdir, log)
    params, step = result.params, result.steps
    heads = MedusaHeads(weight=params["weight"], bias=params["bias"], vocab=heads0.vocab)
    accuracy, coverage = evaluate_heads(target, heads, validation_data, ranks)
    record = {
        "target": target_fingerprint(model_config), "num_heads": num_heads, "draft_vocab": draft_vocab,
        "train_config": config.to_dict(), "train_positions": train_data.num_positions,
        "validation_positions": validation_data.num_positions, "steps": step,
        "final_train_loss": result.final_loss, "wall_time_s": result.seconds, "coverage": coverage,
        "accuracy": accuracy.tolist(), "top1_by_head": accuracy[:, 0].tolist(),
    }
    return MedusaRun(heads=heads, accuracy=accuracy, coverage=coverage, record=record)
