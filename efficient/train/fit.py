"""A resumable optax loop for drafter parameters on cached data (Medusa heads, feature drafters).

    result = fit(params, loss, draw, config, workdir, log=print)

`loss(params, *batch) -> (scalar, metrics)` is minimised with the project's
optimizer (`make_optimizer(config)`: AdamW, warmup and cosine decay); `draw(step)`
returns the batch of a step as a function of the step alone (the callers seed it
with (data_seed, step)), so a run resumed from `workdir`'s orbax checkpoint sees
the batches an uninterrupted one would. The target stays frozen: it is closed
over by `loss`, never a parameter.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from efficient.train.checkpoint import Checkpointer
from efficient.train.config import TrainConfig
from efficient.train.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class FitResult:
    params: Any
    steps: int
    final_loss: float | None  # mean over the last log_every steps
    seconds: float  # wall time of every session of the run, resumed ones included


def fit(params: Any, loss: Callable[..., tuple[jax.Array, Any]], draw: Callable[[int], tuple], config: TrainConfig,
        workdir: str | Path, log: Callable[[str], None] = print) -> FitResult:
    """Train `params` for `config.steps` steps (resuming from `workdir`), checkpointing every
    `config.checkpoint_every` steps and at the end; logs the loss and metrics every `log_every`."""
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    step, prior_seconds, prior_loss = 0, 0.0, None
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(params, opt_state)
        params, opt_state, step = restored.params, restored.opt_state, restored.step
        prior_seconds = float(restored.meta.get("wall_time_s", 0.0))
        prior_loss = restored.meta.get("final_train_loss")
        log(f"resumed at step {step}")

    @jax.jit
    def train_step(params, opt_state, *batch):  # noqa: ANN001, ANN002, ANN202
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, metrics

    start = time.perf_counter()
    losses: list[float] = []

    def recent_loss() -> float | None:
        return float(np.mean(losses[-max(config.log_every, 1):])) if losses else prior_loss

    while step < config.steps:
        params, opt_state, value, metrics = train_step(params, opt_state, *draw(step))
        step += 1
        losses.append(float(value))
        if config.log_every and step % config.log_every == 0:
            shown = jax.tree.map(lambda m: np.round(np.asarray(m), 3).tolist(), metrics)
            log(f"step {step}/{config.steps} loss {np.mean(losses[-config.log_every:]):.3f} {shown} "
                f"({time.perf_counter() - start:.0f} s)")
        if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
            checkpointer.save(step, params, opt_state, {"wall_time_s": prior_seconds + time.perf_counter() - start,
                                                        "final_train_loss": recent_loss()})
    checkpointer.close()
    return FitResult(params=params, steps=step, final_loss=recent_loss(),
                     seconds=prior_seconds + time.perf_counter() - start)
