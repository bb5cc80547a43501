"""Gemma 3's hybrid cache against the dense cache: memory and decode step time as the
context grows, with the logits of every measured step compared.

A random-weight model with Gemma 3's attention geometry (config.model: the layer
count, 5 local : 1 global pattern, KV heads, head size and window of Gemma 3 1B by
default, with a narrow residual stream so a CPU runs it) is prefilled once per
context length into each cache; then `steps` single-token decode steps are timed
(jitted, after a warm-up step) and their logits compared between the caches. Cache
bytes are `nbytes()` of the caches actually used. The KV memory depends only on the
attention geometry, so the memory column is Gemma 3 1B's; the speed column is this
narrow model's. Run through `experiments.run`; configs/hybrid_cache.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from efficient.cache import DenseKVCache, HybridKVCache
from efficient.models import LlamaModel, ModelConfig, forward, jit_forward
from experiments.common import ExperimentResult, check_positive, format_table, machine_info


@dataclasses.dataclass(frozen=True)
class Settings:
    model: dict[str, Any]
    contexts: tuple[int, ...]
    steps: int
    max_step: int
    seed: int

    def __post_init__(self) -> None:
        check_positive(self, "steps", "max_step")
        if not self.contexts or list(self.contexts) != sorted(set(self.contexts)) or self.contexts[0] < 1:
            raise ValueError(f"config.contexts: expected increasing positive ints, got {self.contexts!r}")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    return Settings(model=dict(config.model), contexts=tuple(config.contexts), steps=config.steps,
                    max_step=config.max_step, seed=config.seed)


def build_model(hf: dict[str, Any], seed: int) -> LlamaModel:
    """A random-weight Gemma 3 text model from HF-style config keys."""
    config = ModelConfig.from_hf({"model_type": "gemma3_text", **hf}, dtype="float32")
    return LlamaModel(config, rngs=nnx.Rngs(seed))


def measure(model: LlamaModel, make_cache: Callable[[int], Any], context: int, steps: int,
            seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """Prefill `context` random tokens, then time `steps` decode steps; (row, logits [steps, V])."""
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(1, model.config.vocab_size, size=(1, context)), jnp.int32)
    cache = make_cache(context + steps + 1)
    prefill = jax.jit(lambda c, t: forward(model, t, cache=c, fresh_cache=True, logits_indices=jnp.asarray([[context - 1]])))
    start = time.perf_counter()
    logits, cache = prefill(cache, prompt)
    logits.block_until_ready()
    prefill_seconds = time.perf_counter() - start
    step = jit_forward(model, check_values=False)
    token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
    logits, cache = step(token, cache=cache)  # warm-up (compiles)
    outs, times = [], []
    for _ in range(steps):
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        start = time.perf_counter()
        logits, cache = step(token, cache=cache)
        logits.block_until_ready()
        times.append(time.perf_counter() - start)
        outs.append(np.asarray(logits[0, -1]))
    row = dict(context=context, cache_mib=cache.nbytes() / 2**20, step_ms=float(np.median(times)) * 1e3,
               prefill_s=prefill_seconds)
    return row, np.stack(outs)


def plot(rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(9.0, 3.6))
    for i, (key, label) in enumerate((("cache_mib", "cache MiB"), ("step_ms", "decode step ms (median)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in ("dense", "hybrid"):
            picked = [r for r in rows if r["cache"] == name]
            ax.plot([r["context"] for r in picked], [r[key] for r in picked], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    s = settings_from(config)
    model = build_model(s.model, s.seed)
    cfg = model.config
    if s.contexts[-1] + s.steps + 1 > cfg.max_position_embeddings:
        raise ValueError(f"config.contexts: {s.contexts[-1]} + {s.steps + 1} tokens exceed "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    caches = {"dense": lambda capacity: DenseKVCache.for_model(cfg, 1, capacity),
              "hybrid": lambda capacity: HybridKVCache.for_model(cfg, 1, capacity, max_step=s.max_step)}
    rows = []
    for context in s.contexts:
        logits = {}
        for name, make in caches.items():
            row, logits[name] = measure(model, make, context, s.steps, s.seed)
            rows.append(dict(cache=name, **row))
        diff = float(np.abs(logits["hybrid"] - logits["dense"]).max())
        scale = float(np.abs(logits["dense"]).max())
        for row in rows[-2:]:
            row.update(max_logit_diff=diff, max_abs_logit=scale)
        dense, hybrid = rows[-2], rows[-1]
        log(f"[hybrid_cache] context {context}: dense {dense['cache_mib']:.1f} MiB {dense['step_ms']:.2f} ms, "
            f"hybrid {hybrid['cache_mib']:.1f} MiB {hybrid['step_ms']:.2f} ms, max |logit diff| {diff:.2e}")
    windowed = sum(cfg.windowed_layers())
    metrics = dict(rows=rows, machine=machine_info(), steps=s.steps, max_step=s.max_step,
                   model=dict(hf=s.model, layers=cfg.num_layers, windowed_layers=windowed,
                              window=cfg.sliding_window, parameters=cfg.num_parameters()))
    columns = (("context", "context", "d"), ("cache", "cache", "s"), ("cache_mib", "MiB", ".2f"),
               ("step_ms", "step ms", ".2f"), ("prefill_s", "prefill s", ".2f"),
               ("max_logit_diff", "max|dlogit|", ".1e"))
    table = (format_table(rows, columns) + f"\n{cfg.num_layers} layers ({windowed} windowed, window "
             f"{cfg.sliding_window}), ring max_step {s.max_step}, {s.steps} timed decode steps, batch 1")
    return ExperimentResult(metrics=metrics, table=table, figures={"hybrid_cache": plot(rows)})
