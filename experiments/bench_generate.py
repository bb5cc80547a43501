"""Benchmark `generate`: prefill tokens/s, decode tokens/s, and loop overhead.

The overhead ratio compares one step of the jitted `lax.while_loop` decode
(measured as the time difference between running N and 2N steps, divided by
N) with one plain jitted forward of a single token against the same cache:
the loop should add almost nothing (target <= 1.15). Writes
results/bench_generate/<run>/{config.json, metrics.json} and prints a table.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_flags

from efficient.cache import DenseKVCache
from efficient.decoding import generate
from efficient.models import LlamaModel, ModelConfig, fit_cache_to_layers, from_pretrained, jit_forward, set_layer_loop
from experiments.common import machine_info, write_run

def _generate_seconds(model: LlamaModel, prompts: np.ndarray, new_tokens: int, capacity: int,
                      warmup: int, iters: int) -> tuple[float, float, float]:
    """Median (prefill seconds, decode seconds) of `generate` over `iters` runs, and the wall
    seconds of the first call (which compiles the prefill and the decode loop)."""
    start = time.perf_counter()
    generate(model, prompts, max_new_tokens=new_tokens, capacity=capacity, stop_tokens=())
    first_call = time.perf_counter() - start
    for _ in range(warmup - 1):
        generate(model, prompts, max_new_tokens=new_tokens, capacity=capacity, stop_tokens=())
    runs = [generate(model, prompts, max_new_tokens=new_tokens, capacity=capacity, stop_tokens=()).stats
            for _ in range(iters)]
    return (float(np.median([r.prefill_seconds for r in runs])),
            float(np.median([r.decode_seconds for r in runs])), first_call)


def _plain_step_seconds(model: LlamaModel, batch: int, prompt_length: int, capacity: int,
                        warmup: int, iters: int) -> float:
    """One jitted single-token forward against a cache holding the prompt, the
    cache donated and fed back each call (as a hand-written Python decode loop)."""
    step = jit_forward(model, check_values=False)  # no host sync per call, as the loop
    one = jnp.ones((batch, 1), jnp.int32)
    calls = 32

    def run_calls() -> jax.Array:
        cache = fit_cache_to_layers(model, DenseKVCache.for_model(model.config, batch, capacity))  # as generate
        _, cache = step(jnp.ones((batch, prompt_length), jnp.int32), cache=cache)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        for _ in range(calls):
            logits, cache = step(one, cache=cache)
        jax.block_until_ready(logits)
        return jnp.asarray(time.perf_counter() - start)

    for _ in range(warmup):
        run_calls()
    return float(np.median([float(run_calls()) for _ in range(iters)])) / calls


def run(config) -> dict:  # noqa: ANN001
    if config.model_path:
        model = from_pretrained(config.model_path, dtype=config.dtype)
        model_config = model.config
    else:
        model_config = ModelConfig(**config.model.to_dict(), dtype=config.dtype)
        model = LlamaModel(model_config, rngs=nnx.Rngs(config.seed))
    set_layer_loop(model, config.layer_loop)
    rng = np.random.default_rng(config.seed)
    rows = []
    for batch in config.batch_sizes:
        prompts = rng.integers(3, model_config.vocab_size, (batch, config.prompt_length)).astype(np.int32)
        capacity = config.prompt_length + 2 * config.new_tokens + 64
        args = (capacity, config.warmup, config.iters)
        prefill_s, decode_n, first_call = _generate_seconds(model, prompts, config.new_tokens, *args)
        _, decode_2n, _ = _generate_seconds(model, prompts, 2 * config.new_tokens, *args)
        loop_step = (decode_2n - decode_n) / config.new_tokens
        plain_step = _plain_step_seconds(model, batch, config.prompt_length, *args)
        rows.append(dict(
            batch=batch,
            first_call_seconds=first_call,
            prefill_tokens_per_s=batch * config.prompt_length / prefill_s,
            decode_tokens_per_s=batch / loop_step,
            loop_step_ms=1e3 * loop_step,
            plain_step_ms=1e3 * plain_step,
            loop_overhead_ratio=loop_step / plain_step,
        ))
    return dict(
        model=config.model_path or "random",
        layer_loop=config.layer_loop,
        parameters=model_config.num_parameters(),
        machine=machine_info(),
        prompt_length=config.prompt_length,
        new_tokens=config.new_tokens,
        rows=rows,
    )


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value  # defined under __main__ so importing this module defines no flag
    metrics = run(config)
    out = write_run(config, metrics)
    print(f"{metrics['parameters'] / 1e6:.1f}M parameters on {metrics['machine']['device']}, "
          f"prompt {metrics['prompt_length']}, {metrics['new_tokens']} new tokens")
    print(f"{'batch':>5} {'first call s':>12} {'prefill tok/s':>14} {'decode tok/s':>13} {'loop ms':>8} "
          f"{'plain ms':>9} {'ratio':>6}")
    for r in metrics["rows"]:
        print(f"{r['batch']:>5} {r['first_call_seconds']:>12.1f} {r['prefill_tokens_per_s']:>14.1f} "
              f"{r['decode_tokens_per_s']:>13.1f} {r['loop_step_ms']:>8.2f} {r['plain_step_ms']:>9.2f} "
              f"{r['loop_overhead_ratio']:>6.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_generate.py")
    app.run(main)
