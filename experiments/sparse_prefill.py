"""MInference-style dynamic sparse prefill on the real model, against dense prefill.

    python -m experiments.run --config configs/sparse_prefill.py
    python -m experiments.run --config configs/sparse_prefill.py:tiny --config.model.path=<folder>

The head patterns (efficient/attention/sparse_prefill.py) are searched once on
`calibration_files` held-in stdlib files of `calibration_tokens` tokens, for every target
density at once (efficient/attention/sparse_prefill_search.py), and written to `patterns_dir`.
Then, per context length, each method (dense, and MInference at each density) is measured
on held-out data:

- attention recall (dense attention mass on the keys the index covers: listed blocks and
  vertical columns, averaged over queries, heads and layers) and density (keys covered over
  the causal keys, per query block), on the first held-out file of that length;
- bits/byte of every token of `files` held-out stdlib files of that length, scored from one
  prefill (every token's logits come from the sparse attention);
- retrieval: exact match on the real-model baseline's tasks (classic passkey, kv_prose),
  greedy; the prompt is prefilled by the method, the answer decoded densely (MInference
  changes the prefill only);
- time: a whole prefill (logits at the last token, as generate's) and one layer's attention
  on that layer's real queries and keys (index building included), dense against each
  density, interleaved, medians.

Writes results/sparse_prefill/<run_name or timestamp>/ with a density-versus-accuracy plot.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from efficient.attention import DenseView, attention
from efficient.attention.sparse_prefill import SparsePrefill, set_sparse_prefill, sparse_prefill_attention
from efficient.attention.sparse_prefill_search import measure_patterns, save_patterns, search_patterns, visit_layers
from efficient.data.tasks import needle_grid
from efficient.eval.retrieval import score_answer
from efficient.models import jit_forward
from experiments.common import (
    ExperimentResult,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
    machine_info,
)
from experiments.long_context import long_files
from experiments.sparse_attention import _greedy, _interleaved, _prefill


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    tokenizer: str
    dtype: str
    layer_loop: str
    densities: tuple[float, ...]
    calibration_tokens: int
    calibration_files: int
    contexts: tuple[int, ...]
    tasks: tuple[str, ...]
    depths: tuple[float, ...]
    max_new_tokens: int
    files: int
    timing_repeats: int
    timing_layer: int
    block: int
    last_queries: int
    min_tokens: int
    patterns_dir: str
    seed: int

    def __post_init__(self) -> None:
        for d in self.densities:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"config.densities: densities must be in (0, 1], got {self.densities!r}")
        for name in ("calibration_tokens", "calibration_files", "max_new_tokens", "timing_repeats", "block",
                     "last_queries", "min_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"config.{name}: expected a positive int, got {getattr(self, name)!r}")
        if any(n < self.min_tokens for n in self.contexts):
            raise ValueError(f"config.contexts: every context must be at least config.min_tokens={self.min_tokens} "
                             f"(shorter prompts prefill densely), got {self.contexts!r}")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    return Settings(model_path=str(config.model.path), tokenizer=config.model.tokenizer, dtype=config.model.dtype,
                    layer_loop=config.model.layer_loop, densities=tuple(float(d) for d in config.densities),
                    calibration_tokens=config.calibration_tokens, calibration_files=config.calibration_files,
                    contexts=tuple(config.contexts),
                    tasks=tuple(config.tasks), depths=tuple(config.depths), max_new_tokens=config.max_new_tokens,
                    files=config.files, timing_repeats=config.timing_repeats, timing_layer=config.timing_layer,
                    block=config.block, last_queries=config.last_queries, min_tokens=config.min_tokens,
                    patterns_dir=config.patterns_dir,
                    seed=config.seed)


def method_name(density: float | None) -> str:
    return "dense" if density is None else f"minference {density:g}"


def calibrate(model: Any, tokenizer: Any, s: Settings, log: Callable) -> tuple[dict[str, SparsePrefill], dict]:
    """Patterns per density from one held-in file, and what the search measured on it."""
    files = long_files(load_documents("stdlib", (".py",), "train"), tokenizer, s.calibration_tokens,
                       s.calibration_files)
    if len(files) < s.calibration_files:
        raise ValueError(f"config.calibration_tokens: fewer than {s.calibration_files} held-in stdlib files have "
                         f"{s.calibration_tokens} tokens")
    path = ", ".join(p for p, _ in files)
    start = time.perf_counter()
    found = search_patterns(model, jnp.asarray(np.stack([ids for _, ids in files])), s.densities, block=s.block,
                            last_queries=s.last_queries, min_tokens=s.min_tokens)
    patterns, record = {}, dict(files=path, tokens=s.calibration_tokens, seconds=time.perf_counter() - start,
                                densities={})
    for d, (p, head) in zip(s.densities, found, strict=True):
        patterns[method_name(d)] = p
        if s.patterns_dir:
            save_patterns(Path(s.patterns_dir) / f"patterns-{d:g}.json", p, model.config,
                          meta=dict(calibration_files=path, calibration_tokens=s.calibration_tokens, target_density=d,
                                    recall=float(head.recall.mean()), density=float(head.density.mean())))
        record["densities"][f"{d:g}"] = dict(counts=p.counts(), recall=float(head.recall.mean()),
                                             density=float(head.density.mean()),
                                             recall_by_layer=np.round(head.recall.mean(1), 4).tolist())
        log(f"search {d:g} on {path}: {p.counts()}, recall {head.recall.mean():.4f}, "
            f"density {head.density.mean():.4f}")
    return patterns, record


def _steps(model: Any, patterns: dict[str, SparsePrefill]) -> dict[str, Callable]:
    """A compiled forward per method (the patterns are the model's static attribute)."""
    steps = {"dense": jit_forward(set_sparse_prefill(model, None), check_values=False)}
    for name, p in patterns.items():
        steps[name] = jit_forward(set_sparse_prefill(model, p), check_values=False)
    set_sparse_prefill(model, None)
    return steps


def quality(model: Any, tokenizer: Any, s: Settings, patterns: dict[str, SparsePrefill],
            steps: dict[str, Callable], log: Callable) -> tuple[list[dict], list[dict]]:
    """(bits/byte and recall rows, retrieval rows) per context and method."""
    documents = load_documents("stdlib", (".py",), "test")
    rows, records = [], []
    stop = set(model.config.eos_token_ids)
    for n in s.contexts:
        files = long_files(documents, tokenizer, n + 1, s.files)
        kept = dict(zip(patterns, measure_patterns(model, jnp.asarray(files[0][1][:n])[None],
                                                   list(patterns.values())), strict=True)) if files else {}
        nll = {name: 0.0 for name in steps}
        num_bytes = 0
        for _, ids in files:
            num_bytes += tokenizer.num_bytes(ids[1:n + 1].tolist())
            for name, step in steps.items():
                logits, _ = step(jnp.asarray(ids[None, :n]))
                logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
                nll[name] += -float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(ids[1:n + 1])[:, None], -1)))
        for name in steps:
            recall, density = kept.get(name, (np.ones((1, 1)), np.ones((1, 1))))
            rows.append(dict(context=n, method=name, files=len(files),
                             bits_per_byte=nll[name] / math.log(2) / num_bytes if files else None,
                             attention_recall=float(recall.mean()), density=float(density.mean()),
                             min_layer_recall=float(recall.mean(1).min())))
            log(f"{n} {name}: bits/byte {rows[-1]['bits_per_byte']}, recall {rows[-1]['attention_recall']:.4f}, "
                f"density {rows[-1]['density']:.4f}")
        capacity = -(-(n + s.max_new_tokens) // 16) * 16
        for task in s.tasks:
            kwargs = dict(num_keys=1, style="quiz") if task == "kv_prose" else {}
            for example in needle_grid(tokenizer, [n], s.depths, task=task, seed=s.seed,
                                       capacity=model.config.max_position_embeddings - s.max_new_tokens, **kwargs):
                prompt = tokenizer.encode(example.prompt)
                for name, step in steps.items():
                    first, cache = _prefill(step, model, prompt, n, capacity)
                    text = tokenizer.decode(_greedy(steps["dense"], cache, first, len(prompt), s.max_new_tokens,
                                                    stop))
                    exact, _ = score_answer(example.answer, text)
                    records.append(dict(task=task, context=n, depth=example.depth, method=name, exact=bool(exact),
                                        output=text))
                log(f"{task} {n} depth {example.depth:g}: " + ", ".join(
                    f"{r['method']} {'ok' if r['exact'] else 'MISS'}" for r in records[-len(steps):]))
    return rows, records


def times(model: Any, tokenizer: Any, s: Settings, patterns: dict[str, SparsePrefill],
          steps: dict[str, Callable]) -> list[dict]:
    """Whole prefill and one layer's attention, dense against each density, per context."""
    documents = load_documents("stdlib", (".py",), "test")
    rows = []
    config = model.config
    for n in s.contexts:
        files = long_files(documents, tokenizer, n, 1)
        if not files:
            continue
        tokens = jnp.asarray(files[0][1][None, :n])
        last = jnp.asarray([[n - 1]], jnp.int32)
        prefill = _interleaved({name: (lambda step=step: step(tokens, logits_indices=last)[0])
                                for name, step in steps.items()}, s.timing_repeats)
        layer = min(s.timing_layer, config.num_layers - 1)
        seen = iter(range(config.num_layers))  # keep the timed layer's q and k only, not every layer's
        q, k, positions, spec = visit_layers(model, tokens, lambda *x: x if next(seen) == layer else None)[layer]
        v = jax.random.normal(jax.random.PRNGKey(s.seed), k.shape, k.dtype)
        fns = {"dense": jax.jit(lambda q, k, v: attention(q, DenseView(k, v, positions), spec=spec,
                                                        q_positions=positions, implementation="xla"))}
        for name, p in patterns.items():
            fns[name] = jax.jit(lambda q, k, v, p=p: sparse_prefill_attention(q, k, v, positions, positions, p, layer,
                                                                                spec=spec))
        attn = _interleaved({name: (lambda fn=fn: fn(q, k, v)) for name, fn in fns.items()}, s.timing_repeats)
        for name in steps:
            rows.append(dict(context=n, method=name, prefill_s=prefill[name],
                             prefill_speedup=prefill["dense"] / prefill[name], attention_ms=1e3 * attn[name],
                             attention_speedup=attn["dense"] / attn[name], layer=layer))
    return rows


def plot(summary: list[dict], s: Settings) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for n in s.contexts:
        cells = sorted((r for r in summary if r["context"] == n), key=lambda r: r["density"])
        for ax, key in zip(axes, ("attention_recall", "bits_per_byte", "exact_match"), strict=True):
            pts = [(r["density"], r[key]) for r in cells if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{n} tokens")
    for ax, label in zip(axes, ("attention recall", "bits/byte (every token)", "retrieval exact match"),
                         strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("causal-block density (1 = dense)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("MInference-style sparse prefill on SmolLM2-135M-Instruct")
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    s = settings_from(config)
    model = load_model(s.model_path, dtype=s.dtype or None, layer_loop=s.layer_loop)
    tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
    start = time.perf_counter()
    patterns, search = calibrate(model, tokenizer, s, log)
    steps = _steps(model, patterns)
    rows, records = quality(model, tokenizer, s, patterns, steps, log)
    time_rows = times(model, tokenizer, s, patterns, steps)
    summary = []
    for r in rows:
        cells = [x["exact"] for x in records if x["context"] == r["context"] and x["method"] == r["method"]]
        t = next((x for x in time_rows if x["context"] == r["context"] and x["method"] == r["method"]), {})
        summary.append({**r, "exact_match": float(np.mean(cells)) if cells else None,
                        **{key: t.get(key) for key in ("prefill_s", "prefill_speedup", "attention_ms",
                                                       "attention_speedup")}})
    table = format_table(summary, [
        ("context", "context", "d"), ("method", "method", "s"), ("density", "density", ".3f"),
        ("attention_recall", "recall", ".4f"), ("min_layer_recall", "worst layer", ".3f"),
        ("bits_per_byte", "bits/byte", ".4f"), ("exact_match", "exact", ".2f"), ("prefill_s", "prefill s", ".2f"),
        ("prefill_speedup", "prefill x", ".2f"), ("attention_ms", "attn ms", ".1f"),
        ("attention_speedup", "attn x", ".2f")])
    metrics = dict(summary=summary, retrieval=records, search=search, seconds=time.perf_counter() - start,
                   machine=machine_info(), block=s.block, min_tokens=s.min_tokens)
    return ExperimentResult(metrics=metrics, table=table, figures={"density_accuracy": plot(summary, s)})
