"""N requests behind one long shared system prompt: dense cache vs paged cache with prefix sharing.

Dense: the N rows [system prompt + own suffix] are prefilled together into a dense
cache of N rows. Paged: the system prompt is prefilled once into a one-row paged
cache, `fork`ed into N rows that share its pages, and only the N suffixes are
prefilled (the first write into the shared partial page copies it). Reported per
N: prefill wall time (jitted, after a compiling warm-up of the same shapes),
cache memory (dense: `nbytes()`; paged: `used_nbytes()`, shared pages counted
once) and the largest difference of the suffixes' last logits between the two
(they must agree: prefix sharing is lossless). Run through `experiments.run`;
configs/prefix_sharing.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient.cache import DenseKVCache, PagedKVCache
from efficient.models import LlamaModel, jit_forward, resolve_model_path
from experiments.common import (
    ExperimentResult,
    code_prompts,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
    machine_info,
)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    fn()  # compile (same shapes)
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def measure(model: LlamaModel, system: np.ndarray, suffixes: np.ndarray, page_size: int) -> dict[str, Any]:
    """One N: dense and paged prefill of [system + suffix_i] for the N suffixes [N, U]."""
    n, u = suffixes.shape
    cfg, step = model.config, jit_forward(model, donate_cache=False)
    capacity = -(-(system.size + u) // page_size) * page_size
    full = jnp.asarray(np.concatenate([np.repeat(system[None], n, 0), suffixes], axis=1), jnp.int32)

    def dense() -> tuple[jax.Array, DenseKVCache]:
        return step(full, cache=DenseKVCache.for_model(cfg, n, capacity))

    pool = (capacity // page_size) + n * (-(-u // page_size) + 1)

    def paged() -> tuple[jax.Array, PagedKVCache]:
        one = PagedKVCache.for_model(cfg, 1, capacity, page_size=page_size, num_pages=pool, oversubscribe=True)
        _, one = step(jnp.asarray(system[None], jnp.int32), cache=one)
        return step(jnp.asarray(suffixes, jnp.int32), cache=one.fork(jnp.zeros((n,), jnp.int32)))

    (dense_logits, dense_cache), dense_s = _timed(dense)
    (paged_logits, paged_cache), paged_s = _timed(paged)
    diff = float(jnp.max(jnp.abs(dense_logits[:, -1] - paged_logits[:, -1])))
    return dict(requests=n, dense_prefill_s=dense_s, paged_prefill_s=paged_s, speedup=dense_s / paged_s,
                dense_mib=dense_cache.nbytes() / 2**20, paged_mib=paged_cache.used_nbytes() / 2**20,
                memory_ratio=dense_cache.nbytes() / paged_cache.used_nbytes(), max_logit_diff=diff,
                exhausted=bool(paged_cache.exhausted))


def plot(rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(9.0, 3.6))
    for i, (keys, label) in enumerate(((("dense_mib", "paged_mib"), "cache MiB"),
                                       (("dense_prefill_s", "paged_prefill_s"), "prefill s"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for key in keys:
            ax.plot([r["requests"] for r in rows], [r[key] for r in rows], marker="o", label=key.split("_")[0])
        ax.set_xlabel("requests sharing the system prompt")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    model = load_model(config.model.path, dtype=config.model.dtype)
    tokenizer = load_tokenizer_for(config.model.path, config.model.tokenizer, model.config.vocab_size)
    documents = load_documents("stdlib", (".py",), "test")
    texts = code_prompts(documents, tokenizer, 1 + max(config.requests), config.system_tokens, config.seed)
    system = np.asarray(texts[0], np.int32)
    suffix_pool = np.asarray([t[: config.suffix_tokens] for t in texts[1:]], np.int32)
    rows = []
    for n in config.requests:
        row = measure(model, system, suffix_pool[:n], config.page_size)
        rows.append(row)
        log(f"[prefix_sharing] N={n}: dense {row['dense_prefill_s']:.2f} s {row['dense_mib']:.1f} MiB, paged "
            f"{row['paged_prefill_s']:.2f} s {row['paged_mib']:.1f} MiB, max |dlogit| {row['max_logit_diff']:.1e}")
    metrics = dict(rows=rows, machine=machine_info(), model=str(resolve_model_path(config.model.path)),
                   system_tokens=config.system_tokens, suffix_tokens=config.suffix_tokens,
                   page_size=config.page_size)
    columns = (("requests", "N", "d"), ("dense_prefill_s", "dense s", ".2f"), ("paged_prefill_s", "paged s", ".2f"),
               ("speedup", "speedup", ".2f"), ("dense_mib", "dense MiB", ".1f"), ("paged_mib", "paged MiB", ".1f"),
               ("memory_ratio", "dense/paged", ".2f"), ("max_logit_diff", "max|dlogit|", ".1e"))
    table = (format_table(rows, columns) + f"\nsystem prompt {config.system_tokens} tokens, suffixes "
             f"{config.suffix_tokens} tokens, pages of {config.page_size}")
    return ExperimentResult(metrics=metrics, table=table, figures={"prefix_sharing": plot(rows)})
