"""`TrainConfig`: the typed, validated description of one training run."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a next-token training run.

    The learning rate warms up linearly from 0 to `peak_lr` over
    `warmup_steps`, then follows a cosine to `peak_lr * min_lr_ratio` at
    `steps`. Parameters and optimizer state are float32; with
    `compute_dtype="bfloat16"` activations and matmuls run in bfloat16.
    `*_every = 0` disables periodic eval / checkpoints / logs (a final eval
    and checkpoint always happen).
    """

    batch_size: int = 8  # B
    microbatches: int = 1  # gradient accumulation: B is split into this many chunks (memory / M)
    seq_len: int = 512  # T (windows are [B, T+1])
    steps: int = 1000
    peak_lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of peak_lr
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    compute_dtype: str = "float32"
    eval_every: int = 200
    eval_batch_size: int = 8
    eval_max_windows: int = 64  # validation windows scored (evenly spaced); 0 = all
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0  # parameter init
    data_seed: int = 0  # batch order

    def __post_init__(self) -> None:
        positive = ("batch_size", "microbatches", "seq_len", "steps", "eval_batch_size", "keep_checkpoints")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        non_negative = ("warmup_steps", "eval_every", "eval_max_windows", "checkpoint_every",
                        "log_every", "seed", "data_seed")
        for name in non_negative:
            _check_int(name, getattr(self, name), minimum=0)
        if self.batch_size % self.microbatches:
            raise ValueError(
                f"TrainConfig.microbatches={self.microbatches} must divide batch_size={self.batch_size}"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be <= steps={self.steps}, got {self.warmup_steps}"
            )
        _check_float("peak_lr", self.peak_lr, positive=True)
        for name in ("weight_decay", "grad_clip_norm", "eps"):
            _check_float(name, getattr(self, name), positive=False)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {value!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"TrainConfig.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else "an int >= 0"
        raise ValueError(f"TrainConfig.{name} must be {kind}, got {value!r}")


def _check_float(name: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        kind = "a finite float > 0" if positive else "a finite float >= 0"
        raise ValueError(f"TrainConfig.{name} must be {kind}, got {value!r}")
