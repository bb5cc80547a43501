"""One-token decode step, variants of layer loop / cache storage / decode attention
interleaved in one process (`configs/bench_decode_step.py` lists them).

Each variant gets its own jitted step and its own cache, prefilled with the cell's
tokens; repetitions cycle through the variants, each timing `steps` consecutive
steps, and medians are reported. The cache is truncated back to the held tokens
after every timed call, so the fill stays the cell's. Writes
results/bench_decode_step/<run>/{config.json, metrics.json} and prints a table.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_flags

from efficient.attention import blockwise
from efficient.cache import DenseKVCache
from efficient.models import LlamaModel, ModelConfig, from_pretrained, jit_forward, resolve_model_path, set_layer_loop
from experiments.common import machine_info, write_run

VARIANTS = ("scan/stacked", "unrolled/stacked", "unrolled/per_layer/mat", "unrolled/per_layer")


@contextlib.contextmanager
def _materialised_decode(on: bool) -> Iterator[None]:
    """While tracing, never pick the blockwise decode over [B, K, S, H] caches (the
    choice is read at trace time: the compiled step keeps it)."""
    saved = blockwise.BLOCKWISE_MIN_DECODE_S_BY_HEAD
    if on:
        blockwise.BLOCKWISE_MIN_DECODE_S_BY_HEAD = 2**62
    try:
        yield
    finally:
        blockwise.BLOCKWISE_MIN_DECODE_S_BY_HEAD = saved


def _models(config: Any) -> dict[str, LlamaModel]:
    def load() -> LlamaModel:
        if config.model:
            return from_pretrained(resolve_model_path(config.model), dtype=config.dtype)
        cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, dtype=config.dtype)
        return LlamaModel(cfg, rngs=nnx.Rngs(0))

    loops = {variant.split("/")[0] for variant in config.variants}
    return {loop: set_layer_loop(load(), loop) for loop in sorted(loops)}


def run(config: Any) -> dict:
    for variant in config.variants:
        if variant not in VARIANTS:
            raise ValueError(f"variants: {variant!r} is not one of {VARIANTS}")
    models = _models(config)
    rows = []
    for batch, capacity, held in config.cells:
        if not 0 < held < capacity - config.steps:
            raise ValueError(f"cells: tokens held {held} must leave room for {config.steps} steps in "
                             f"capacity {capacity}")
        steps, caches = {}, {}
        one = jnp.ones((batch, 1), jnp.int32)
        for variant in config.variants:
            loop, storage = variant.split("/")[:2]
            model = models[loop]
            with _materialised_decode(variant.endswith("/mat")):
                step = jit_forward(model, check_values=False)
                cache = DenseKVCache.for_model(model.config, batch, capacity)
                cache = cache.split_layers() if storage == "per_layer" else cache
                _, cache = step(jnp.ones((batch, held), jnp.int32), cache=cache)
                logits, cache = step(one, cache=cache)  # compiles the one-token step
            jax.block_until_ready(logits)
            steps[variant], caches[variant] = step, cache.truncate(jnp.full((batch,), held, jnp.int32))
        times: dict[str, list[float]] = {variant: [] for variant in config.variants}
        for _ in range(config.repeats):
            for variant in config.variants:
                cache = caches[variant]
                start = time.perf_counter()
                for _ in range(config.steps):
                    logits, cache = steps[variant](one, cache=cache)
                jax.block_until_ready(logits)
                times[variant].append((time.perf_counter() - start) / config.steps)
                caches[variant] = cache.truncate(jnp.full((batch,), held, jnp.int32))
        rows.append(dict(batch=batch, capacity=capacity, held=held,
                         step_ms={v: 1e3 * float(np.median(t)) for v, t in times.items()}))
    return dict(model=config.model or "random", dtype=config.dtype, machine=machine_info(),
                steps=config.steps, repeats=config.repeats, rows=rows)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value  # defined under __main__ so importing this module defines no flag
    metrics = run(config)
    out = write_run(config, metrics)
    print(f"{metrics['model']} {metrics['dtype']} on {metrics['machine']['device']}: step ms (median)")
    print(f"{'batch':>5} {'capacity':>8} {'held':>5} " + " ".join(f"{v:>23}" for v in config.variants))
    for r in metrics["rows"]:
        print(f"{r['batch']:>5} {r['capacity']:>8} {r['held']:>5} "
              + " ".join(f"{r['step_ms'][v]:>23.1f}" for v in config.variants))
    print(f"wrote {out}")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_decode_step.py")
    app.run(main)
