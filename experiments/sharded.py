"""The model, its caches and sequence-parallel attention on a mesh (configs/sharded.py).

    python -m experiments.run --config configs/sharded.py

Part 1, per (data x model) mesh shape: the model sharded by the config's rules, a batch of
held-out stdlib prompts generated greedily (tokens equal to one device's?), the prefill
logits' largest difference from one device's, the most bytes of parameters and of the
dense cache that any device holds (against total / model-axis size), the temporary memory
per device of the compiled prefill and decode programs (XLA's memory analysis), prefill and
one-token decode step times (medians; simulated devices share this CPU, so these show
overheads, not speed-ups), and the collectives in the compiled decode step (with the
largest all-gather, which must stay far below a layer's cache).

Part 2, ring attention against DeepSpeed-Ulysses on a sequence axis of each size: bytes
each device sends (read from the compiled HLO, hops unrolled: collective-permute results,
and (n-1)/n of all-to-all and all-gather results), and each device's memory for forward
plus backward (XLA's memory analysis: arguments + temporaries), which should fall as 1/n.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _simulate_devices(count: int) -> None:
    """Ask XLA:CPU for `count` devices (only effective before jax starts its backend)."""
    if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}={count}".strip()


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from efficient.attention import AttentionSpec  # noqa: E402
from efficient.cache import DenseKVCache  # noqa: E402
from efficient.decoding import generate  # noqa: E402
from efficient.models import forward, jit_forward, resolve_model_path  # noqa: E402
from efficient.parallel import (  # noqa: E402
    NAMED_RULES,
    AxisRules,
    ModelSharding,
    build_cache,
    device_bytes,
    make_mesh,
    ring_attention,
    shard_model,
    ulysses_attention,
)
from efficient.parallel.hlo import hlo_collectives  # noqa: E402
from experiments.common import (  # noqa: E402
    ExperimentResult,
    code_prompts,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
    machine_info,
)



def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _compiled_forward(model: Any, cache: Any, tokens: jax.Array) -> Any:
    """The compiled forward of `tokens` through `cache` (its HLO text and memory analysis)."""
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, c: forward(nnx.merge(graphdef, p), t, cache=c), donate_argnums=2)  # as jit_forward
    return step.lower(params, tokens, cache).compile()


def _temp_mib(compiled: Any) -> float:
    """Temporary memory per device of a compiled program (XLA's memory analysis), MiB."""
    memory = compiled.memory_analysis()
    return float("nan") if memory is None else memory.temp_size_in_bytes / 2**20


def measure_mesh(graphdef: Any, state: Any, shape: tuple[int, int], rules: dict | None, prompts: np.ndarray,
                 reference: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    data, model_axis = shape
    sharding = ModelSharding(make_mesh(data=data, model=model_axis), AxisRules.of(rules))
    model = shard_model(nnx.merge(graphdef, state), sharding)
    params = nnx.state(model, nnx.Param)
    total_params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    out = generate(model, prompts.tolist(), max_new_tokens=config.new_tokens, stop_tokens=())
    tokens_equal = out.sequences() == reference["greedy"]
    capacity = prompts.shape[1] + config.new_tokens
    cache = build_cache(DenseKVCache.for_model, model.config, prompts.shape[0], capacity, sharding)
    step = jit_forward(model, check_values=False)
    logits, cache = step(jnp.asarray(prompts), cache=cache)
    diff = float(np.max(np.abs(np.asarray(logits) - reference["logits"])))
    cache_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    cache_bytes = max(device_bytes(cache).values())
    decode_program = _compiled_forward(model, cache, jnp.zeros((prompts.shape[0], 1), jnp.int32))
    prefill_program = _compiled_forward(model, cache, jnp.asarray(prompts))
    hlo = hlo_collectives(decode_program.as_text())
    layer_cache = cache.k[0].size * cache.k.dtype.itemsize if not cache.per_layer else cache.k[0].size * 4
    largest_gather = max(hlo["bytes"]["all-gather"], default=0)
    prefill_ms = _median_ms(lambda: step(jnp.asarray(prompts), cache=build_cache(
        DenseKVCache.for_model, model.config, prompts.shape[0], capacity, sharding))[0], config.timing_repeats)
    last = jnp.asarray(prompts[:, -1:])
    state_box = [cache]

    def decode() -> jax.Array:
        # The same position each time (a rewrite of one slot): a decode step's cost, repeatably.
        out, state_box[0] = step(last, positions=jnp.full_like(last, prompts.shape[1]), cache=state_box[0].truncate(
            jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)))
        return out

    decode_ms = _median_ms(decode, config.timing_repeats)
    return dict(mesh=f"{data}x{model_axis}", tokens_equal=tokens_equal, max_logit_diff=diff,
                param_mib=max(device_bytes(params).values()) / 2**20, param_share=max(device_bytes(params).values())
                / (total_params / model_axis), cache_mib=cache_bytes / 2**20,
                cache_share=cache_bytes / (cache_total / (data * model_axis)), prefill_ms=prefill_ms,
                decode_ms=decode_ms, prefill_temp_mib=_temp_mib(prefill_program),
                decode_temp_mib=_temp_mib(decode_program), collectives=hlo["counts"],
                largest_all_gather_bytes=largest_gather,
                layer_cache_bytes=layer_cache)


def measure_attention(method: str, n: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    a = config.attention
    mesh = make_mesh(sequence=n, devices=jax.devices()[:n])
    shapes = [(1, a.sequence, heads, a.head_dim) for heads in (a.heads, a.kv_heads, a.kv_heads)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    positions = jnp.arange(a.sequence, dtype=jnp.int32)[None]
    spec = AttentionSpec()

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if method == "ring":
            return ring_attention(q, k, v, mesh=mesh, q_positions=positions, kv_positions=positions, spec=spec,
                                  unroll_hops=True)
        return ulysses_attention(q, k, v, mesh=mesh, q_positions=positions, kv_positions=positions, spec=spec)

    def train_step(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple:
        return jax.grad(lambda *x: jnp.sum(attend(*x) ** 2), argnums=(0, 1, 2))(q, k, v)

    compiled = jax.jit(train_step).lower(*args).compile()
    hlo = hlo_collectives(compiled.as_text())
    moved = sum(hlo["bytes"]["collective-permute"]) + (n - 1) / n * (
        sum(hlo["bytes"]["all-to-all"]) + sum(hlo["bytes"]["all-gather"]))
    memory = compiled.memory_analysis()
    per_device = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) if memory is not None else float("nan")
    return dict(method=method, devices=n, sent_mib=moved / 2**20, memory_mib=per_device / 2**20,
                collectives=hlo["counts"])


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    _simulate_devices(config.devices)
    if len(jax.devices()) < config.devices:
        raise ValueError(f"config.devices: {config.devices} devices requested but jax started with "
                         f"{len(jax.devices())}; set XLA_FLAGS={_DEVICE_FLAG}={config.devices} before jax starts")
    for shape in config.meshes:
        if len(shape) != 2 or shape[0] * shape[1] != config.devices:
            raise ValueError(f"config.meshes: {tuple(shape)} is not a (data, model) shape over {config.devices} devices")
    if config.rules not in NAMED_RULES:
        raise ValueError(f"config.rules must be one of {sorted(NAMED_RULES)}, got {config.rules!r}")
    model = load_model(config.model.path, dtype=config.model.dtype)
    tokenizer = load_tokenizer_for(config.model.path, "auto", model.config.vocab_size)
    documents = load_documents("stdlib", (".py",), "test")
    prompts = np.asarray(code_prompts(documents, tokenizer, config.batch, config.prompt_tokens, config.seed), np.int32)
    graphdef, state = nnx.split(model)
    reference = {"greedy": generate(model, prompts.tolist(), max_new_tokens=config.new_tokens, stop_tokens=()).sequences()}
    cache = DenseKVCache.for_model(model.config, prompts.shape[0], prompts.shape[1] + config.new_tokens)
    reference["logits"] = np.asarray(jit_forward(model)(jnp.asarray(prompts), cache=cache)[0])
    rows = []
    for shape in config.meshes:
        row = measure_mesh(graphdef, state, tuple(shape), NAMED_RULES[config.rules], prompts, reference, config)
        rows.append(row)
        log(f"[sharded] mesh {row['mesh']}: tokens equal {row['tokens_equal']}, max |dlogit| "
            f"{row['max_logit_diff']:.1e}, params {row['param_mib']:.1f} MiB/device, decode {row['decode_ms']:.1f} ms")
    attention_rows = []
    for n in config.attention.axis_sizes:
        for method in ("ring", "ulysses"):
            if method == "ulysses" and config.attention.heads % n:
                continue
            attention_rows.append(measure_attention(method, n, config))
            log(f"[sharded] {method} over {n} devices: {attention_rows[-1]['sent_mib']:.1f} MiB sent, "
                f"{attention_rows[-1]['memory_mib']:.1f} MiB per device")
    c = model.config
    metrics = dict(meshes=rows, attention=attention_rows, machine=machine_info(), rules=config.rules,
                   model=str(resolve_model_path(config.model.path)), batch=config.batch,
                   prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens,
                   heads=dict(query=c.num_heads, kv=c.num_kv_heads, mlp=c.intermediate_size, vocab=c.vocab_size),
                   attention_shape=config.attention.to_dict())
    columns = (("mesh", "mesh", "s"), ("tokens_equal", "tokens =", ""), ("max_logit_diff", "max|dlogit|", ".1e"),
               ("param_mib", "params MiB/dev", ".1f"), ("param_share", "/ (total/model)", ".2f"),
               ("cache_mib", "cache MiB/dev", ".2f"), ("cache_share", "/ (total/devices)", ".2f"),
               ("prefill_ms", "prefill ms", ".1f"), ("decode_ms", "decode ms", ".1f"),
               ("prefill_temp_mib", "prefill temp MiB/dev", ".1f"), ("decode_temp_mib", "decode temp MiB/dev", ".2f"))
    attention_columns = (("method", "method", "s"), ("devices", "n", "d"), ("sent_mib", "MiB sent/dev", ".2f"),
                         ("memory_mib", "MiB/dev fwd+bwd", ".1f"))
    table = (format_table(rows, columns) + "\n\n" + format_table(attention_rows, attention_columns)
             + f"\n{config.devices} simulated CPU devices; times show overheads, not speed")
    return ExperimentResult(metrics=metrics, table=table, figures={"sharded": plot(rows, attention_rows)})


def plot(rows: list[dict[str, Any]], attention_rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    meshes = [r["mesh"] for r in rows]
    left.bar(np.arange(len(rows)) - 0.2, [r["param_mib"] for r in rows], 0.4, label="parameters")
    left.bar(np.arange(len(rows)) + 0.2, [r["cache_mib"] for r in rows], 0.4, label="dense cache")
    left.set_xticks(np.arange(len(rows)), meshes)
    left.set_xlabel("mesh (data x model)")
    left.set_ylabel("MiB held by the fullest device")
    left.legend()
    for method in ("ring", "ulysses"):
        points = [(r["devices"], r["memory_mib"]) for r in attention_rows if r["method"] == method]
        if points:
            right.plot(*zip(*points), marker="o", label=f"{method}: memory")
    right.set_xscale("log", base=2)
    right.set_yscale("log", base=2)
    right.set_xlabel("devices on the sequence axis")
    right.set_ylabel("MiB per device (forward + backward)")
    right.legend()
    fig.tight_layout()
    return fig
