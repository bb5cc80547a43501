"""Query-aware sparse decoding on the real model: Quest against dense, at long contexts.

    python -m experiments.run --config configs/sparse_attention.py
    python -m experiments.run --config configs/sparse_attention.py:tiny --config.model.path=<folder>

Quest (Tang et al. 2024) prefills densely and decodes reading only the pages with the
highest key bound (efficient/attention/page_select.py). So every example is prefilled
once, densely, and then decoded from a copy of that cache by each method: dense, and
Quest reading `fractions` of the pages that hold the prompt and answer (16-slot pages,
layers 0-1 dense, as in the paper). Measured per context length:

- Quest's own rule (`quest-paper`: no page always read but a step's own) at
  `paper_fractions`, against the library's default, which always reads the first page
  (attention sinks) and the page before a step's own;
- per-query-head selection (`quest-heads`: each query head reads its own pages, 3x the
  reads of one selection per KV head) at `head_fractions`;
- retrieval: exact match on the real-model baseline's tasks (classic passkey, kv_prose),
  greedy, one example per depth;
- bits/byte of the last `tail` tokens of long held-out stdlib files, each token scored by
  a one-token decode step (so the selection applies to every scored token);
- attention recall: the fraction of dense attention mass (summed over each KV head's query
  heads) in the selected pages, averaged over the selecting layers, heads and those steps;
- decode attention time of one layer (SmolLM2's shapes, one query) and of a whole one-token
  decode step, dense against Quest, interleaved, medians, on caches filled to the context.

Writes results/sparse_attention/<run_name or timestamp>/ with a density-versus-accuracy plot.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient.attention import AttentionSpec, attention
from efficient.attention.dispatcher import register_implementation, unregister_implementation
from efficient.attention.page_select import QuestView, attention_mass_kept, page_bounds
from efficient.attention.views import DenseView
from efficient.attention.xla import xla_implementation
from efficient.cache import DenseKVCache, QuestKVCache
from efficient.cache.dense import _to_storage
from efficient.data.tasks import needle_grid
from efficient.eval.retrieval import score_answer
from efficient.models import jit_forward, set_layer_loop
from experiments.common import (
    ExperimentResult,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
    machine_info,
)
from experiments.long_context import long_files

PAGE = 16
PROBE = "quest_recall_probe"


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    tokenizer: str
    dtype: str
    layer_loop: str
    contexts: tuple[int, ...]
    fractions: tuple[float, ...]
    paper_fractions: tuple[float, ...]
    head_fractions: tuple[float, ...]
    tasks: tuple[str, ...]
    depths: tuple[float, ...]
    max_new_tokens: int
    files: int
    tail: int
    timing_repeats: int
    step_contexts: tuple[int, ...]
    seed: int

    def __post_init__(self) -> None:
        for f in self.fractions + self.paper_fractions + self.head_fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"config.fractions: densities must be in (0, 1], got {self.fractions!r}")
        for name in ("max_new_tokens", "tail", "timing_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"config.{name}: expected a positive int, got {getattr(self, name)!r}")
        for n in self.contexts:
            if n % PAGE or n < 2 * PAGE:
                raise ValueError(f"config.contexts: lengths must be multiples of {PAGE} and >= {2 * PAGE}, "
                                 f"got {self.contexts!r}")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    return Settings(model_path=str(config.model.path), tokenizer=config.model.tokenizer, dtype=config.model.dtype,
                    layer_loop=config.model.layer_loop, contexts=tuple(config.contexts),
                    fractions=tuple(float(f) for f in config.fractions),
                    paper_fractions=tuple(float(f) for f in config.paper_fractions),
                    head_fractions=tuple(float(f) for f in config.head_fractions), tasks=tuple(config.tasks),
                    depths=tuple(config.depths), max_new_tokens=config.max_new_tokens, files=config.files,
                    tail=config.tail, timing_repeats=config.timing_repeats,
                    step_contexts=tuple(config.step_contexts), seed=config.seed)


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def top_pages(fraction: float, tokens: int) -> int:
    """Pages read per step: `fraction` of the pages that `tokens` tokens fill (at least the 4
    always read: the sink page, the recent one and a step's own two)."""
    pages = _round_up(tokens) // PAGE
    return min(pages, max(4, math.ceil(fraction * pages)))


def _copy(cache: Any) -> Any:
    return jax.tree_util.tree_map(jnp.copy, cache)


# Quest's own rule (no page always read but a step's own) against the library's default
# (the first page, attention sinks, and the page before a step's own always read).
PAPER_RULE = dict(sink_pages=0, recent_pages=0)


def _method_cache(dense: DenseKVCache, fraction: float | None, tokens: int, dense_layers: tuple[int, ...],
                  settings: dict[str, Any]) -> Any:
    if fraction is None:
        return _copy(dense)
    return QuestKVCache.from_dense(dense, page_size=PAGE, top_pages=top_pages(fraction, tokens),
                                   dense_layers=dense_layers, **settings)


def _prefill(step: Callable, model: Any, prompt: list[int], width: int, capacity: int) -> tuple[int, DenseKVCache]:
    """Dense prefill of `prompt` padded to `width` tokens (one compile per width); the first
    greedy token and the cache truncated to the prompt."""
    n = len(prompt)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = prompt
    positions = np.where(np.arange(width) < n, np.arange(width), -1)[None].astype(np.int32)
    cache = DenseKVCache.for_model(model.config, 1, capacity)
    logits, cache = step(jnp.asarray(tokens), positions=jnp.asarray(positions), cache=cache,
                         logits_indices=jnp.asarray([[n - 1]], jnp.int32))
    return int(jnp.argmax(logits[0, -1])), cache.truncate(jnp.asarray([n], jnp.int32))


def _greedy(step: Callable, cache: Any, first: int, position: int, max_new: int, stop: set[int]) -> list[int]:
    out, token = [first], first
    for i in range(max_new - 1):
        if token in stop:
            break
        logits, cache = step(jnp.asarray([[token]], jnp.int32), positions=jnp.asarray([[position + i]], jnp.int32),
                             cache=cache)
        token = int(jnp.argmax(logits[0, -1]))
        out.append(token)
    return [t for t in out if t not in stop]


def _methods(s: Settings) -> list[tuple[str, float | None, dict[str, Any]]]:
    """(name, fraction of the pages or None for dense, QuestKVCache settings)."""
    return ([("dense", None, {})] + [(f"quest {f:g}", f, {}) for f in s.fractions]
            + [(f"quest-paper {f:g}", f, PAPER_RULE) for f in s.paper_fractions]
            + [(f"quest-heads {f:g}", f, dict(per_query_head=True)) for f in s.head_fractions])


def retrieval(model: Any, tokenizer: Any, s: Settings, dense_layers: tuple[int, ...], log: Callable) -> list[dict]:
    """One record per (task, context, depth, method)."""
    step = jit_forward(model, check_values=False)
    stop = set(model.config.eos_token_ids)
    records = []
    for task in s.tasks:
        kwargs = dict(num_keys=1, style="quiz") if task == "kv_prose" else {}
        for n in s.contexts:
            capacity = _round_up(n + s.max_new_tokens)
            for example in needle_grid(tokenizer, [n], s.depths, task=task, seed=s.seed,
                                       capacity=model.config.max_position_embeddings - s.max_new_tokens, **kwargs):
                prompt = tokenizer.encode(example.prompt)
                first, dense = _prefill(step, model, prompt, n, capacity)
                for name, fraction, settings in _methods(s):
                    cache = _method_cache(dense, fraction, len(prompt) + s.max_new_tokens, dense_layers, settings)
                    text = tokenizer.decode(_greedy(step, cache, first, len(prompt), s.max_new_tokens, stop))
                    exact, _ = score_answer(example.answer, text)
                    records.append(dict(task=task, context=n, depth=example.depth, method=name, exact=bool(exact),
                                        output=text))
                log(f"{task} {n} depth {example.depth:g}: " + ", ".join(
                    f"{r['method']} {'ok' if r['exact'] else 'MISS'}" for r in records[-len(_methods(s)):]))
    return records


def _probe(recall: list[float]) -> Callable:
    """An "xla" implementation that also reports, per selecting layer, the attention mass its
    pages keep (`attention_mass_kept`) through a host callback."""
    def implementation(q, view, *, spec, q_positions=None, **kwargs):  # noqa: ANN001, ANN202
        out = xla_implementation(q, view, spec=spec, q_positions=q_positions, **kwargs)
        if isinstance(view, QuestView) and view.selects(q.shape[1]):
            kept = jnp.mean(attention_mass_kept(q, view, spec=spec, q_positions=q_positions))
            jax.debug.callback(lambda k, on: recall.append(float(k)) if bool(on) else None, kept,
                               jnp.asarray(view.sparse))
        return out

    return implementation


def bits_per_byte(model: Any, tokenizer: Any, s: Settings, dense_layers: tuple[int, ...], log: Callable
                  ) -> list[dict]:
    """Per (context, method): bits/byte of the last `tail` tokens of each long file, scored by
    one-token decode steps after a dense prefill of the rest; Quest's attention recall."""
    from efficient.attention import CAPABILITIES

    documents = load_documents("stdlib", (".py",), "test")
    rows = []
    recall: list[float] = []
    register_implementation(PROBE, _probe(recall), CAPABILITIES["xla"])
    try:
        step = jit_forward(model, check_values=False)
        probe_step = jit_forward(model, implementation=PROBE, check_values=False)
        for n in s.contexts:
            files = long_files(documents, tokenizer, n + 1, s.files)
            if not files:
                log(f"bits/byte: no held-out file has {n + 1} tokens; skipped")
                continue
            nll = {name: 0.0 for name, _, _ in _methods(s)}
            kept = {name: [] for name, _, _ in _methods(s)}
            num_bytes = 0
            for _, ids in files:
                prefix, scored = ids[:n - s.tail], ids[n - s.tail:n + 1]
                num_bytes += tokenizer.num_bytes(scored[1:].tolist())
                _, dense = _prefill(step, model, prefix.tolist(), n - s.tail, _round_up(n + 1))
                for name, fraction, settings in _methods(s):
                    cache = _method_cache(dense, fraction, n + 1, dense_layers, settings)
                    recall.clear()
                    run = step if fraction is None else probe_step
                    for i in range(s.tail):
                        logits, cache = run(jnp.asarray([[scored[i]]], jnp.int32),
                                            positions=jnp.asarray([[n - s.tail + i]], jnp.int32), cache=cache)
                        logp = jax.nn.log_softmax(logits[0, -1].astype(jnp.float32))
                        nll[name] += -float(logp[int(scored[i + 1])])
                    jax.effects_barrier()
                    kept[name] += recall
            for name, fraction, _ in _methods(s):
                rows.append(dict(context=n, method=name, fraction=fraction or 1.0, files=len(files),
                                 bits_per_byte=nll[name] / math.log(2) / num_bytes,
                                 attention_recall=float(np.mean(kept[name])) if kept[name] else 1.0))
                log(f"bits/byte {n} {name}: {rows[-1]['bits_per_byte']:.4f}, recall {rows[-1]['attention_recall']:.4f}")
    finally:
        unregister_implementation(PROBE)
    return rows


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each thunk, called in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def attention_times(config: Any, s: Settings) -> list[dict]:
    """One layer's decode attention (one query, SmolLM2's heads) over a cache filled to each context."""
    rows = []
    kh, n, h = config.num_kv_heads, config.num_heads, config.head_dim
    for context in s.contexts:
        slots = _round_up(context + s.max_new_tokens)
        key = jax.random.split(jax.random.PRNGKey(s.seed), 3)
        k = jax.random.normal(key[0], (1, kh, slots, h), jnp.float32)
        v = jax.random.normal(key[1], (1, kh, slots, h), jnp.float32)
        q = jax.random.normal(key[2], (1, 1, n, h), jnp.float32)
        lengths = jnp.asarray([context], jnp.int32)
        positions = jnp.where(jnp.arange(slots) < context, jnp.arange(slots), -1)[None].astype(jnp.int32)
        lo, hi = page_bounds(k, positions >= 0, PAGE)
        dense_view = DenseView(k=k, v=v, positions=positions, lengths=lengths, layout="BKSH")
        fns = {"dense": jax.jit(lambda q, view: attention(q, view, spec=AttentionSpec()))}
        args = {"dense": dense_view}
        timed = [(f"quest {f:g}", f, False) for f in s.fractions] + [(f"quest-heads {f:g}", f, True)
                                                                     for f in s.head_fractions]
        for name, f, per_head in timed:
            args[name] = QuestView(k=k, v=v, positions=positions, lengths=lengths, page_min=lo, page_max=hi,
                                   page_size=PAGE, top_pages=top_pages(f, context + s.max_new_tokens),
                                   sink_pages=1, recent_pages=1, per_query_head=per_head)
            fns[name] = fns["dense"]
        times = _interleaved({name: (lambda fn=fn, a=args[name]: fn(q, a)) for name, fn in fns.items()},
                             s.timing_repeats)
        for name, t in times.items():
            rows.append(dict(context=context, method=name, ms=1e3 * t, speedup=times["dense"] / t))
    return rows


def step_times(model: Any, s: Settings, dense_layers: tuple[int, ...]) -> list[dict]:
    """A whole one-token decode step (every layer) through a dense cache and Quest caches filled
    with random keys to each of `step_contexts`, interleaved."""
    rows = []
    unrolled = set_layer_loop(model, "auto")
    step = jit_forward(unrolled, check_values=False)
    per_layer = isinstance(unrolled.layers, nnx.List)
    for context in s.step_contexts:
        capacity = _round_up(context + 4 * s.timing_repeats + 8)
        base = DenseKVCache.for_model(model.config, 1, capacity)
        key = jax.random.split(jax.random.PRNGKey(s.seed), 2)
        slots = jnp.arange(capacity, dtype=jnp.int32)
        base = dataclasses.replace(base, k=_to_storage(jax.random.normal(key[0], base.k.shape), base.dtype),
                                   v=_to_storage(jax.random.normal(key[1], base.v.shape), base.dtype),
                                   positions=jnp.where(slots < context, slots, -1)[None],
                                   lengths=jnp.asarray([context], jnp.int32))
        caches = {"dense": base}
        for f in s.fractions:
            caches[f"quest {f:g}"] = QuestKVCache.from_dense(base, page_size=PAGE, top_pages=top_pages(f, context),
                                                             dense_layers=dense_layers)
        if per_layer:
            caches = {name: c.split_layers() for name, c in caches.items()}
        state = {name: [c, context] for name, c in caches.items()}

        def one(name: str) -> Callable[[], Any]:
            def run() -> Any:
                cache, at = state[name]
                logits, cache = step(jnp.asarray([[1]], jnp.int32), positions=jnp.asarray([[at]], jnp.int32),
                                     cache=cache)
                state[name] = [cache.truncate(jnp.asarray([context], jnp.int32)), at]
                return logits
            return run

        times = _interleaved({name: one(name) for name in caches}, s.timing_repeats)
        for name, t in times.items():
            rows.append(dict(context=context, method=name, ms=1e3 * t, speedup=times["dense"] / t))
    return rows


def plot(retrieval_rows: list[dict], bpb_rows: list[dict], s: Settings) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for n in s.contexts:
        xs, ys = [], []
        for name, fraction, settings in _methods(s):
            cells = [r["exact"] for r in retrieval_rows if r["context"] == n and r["method"] == name]
            if cells and not settings:
                xs.append(fraction or 1.0)
                ys.append(float(np.mean(cells)))
        axes[0].plot(xs, ys, marker="o", label=f"{n} tokens")
        pts = [(r["fraction"], r["bits_per_byte"]) for r in bpb_rows
               if r["context"] == n and r["method"].split(" ")[0] in ("dense", "quest")]
        if pts:
            axes[1].plot(*zip(*sorted(pts)), marker="o", label=f"{n} tokens")
    for ax, label in ((axes[0], "retrieval exact match"), (axes[1], "bits/byte (last tokens)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of pages read per step (1 = dense)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("Quest on SmolLM2-135M-Instruct: density against accuracy")
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    s = settings_from(config)
    model = load_model(s.model_path, dtype=s.dtype or None, layer_loop=s.layer_loop)
    tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
    dense_layers = tuple(range(min(2, model.config.num_layers - 1)))
    start = time.perf_counter()
    retrieval_rows = retrieval(model, tokenizer, s, dense_layers, log) if s.tasks else []
    bpb_rows = bits_per_byte(model, tokenizer, s, dense_layers, log) if s.files else []
    attn_rows = attention_times(model.config, s)
    step_rows = step_times(model, s, dense_layers) if s.step_contexts else []
    summary = []
    for n in s.contexts:
        for name, fraction, _ in _methods(s):
            cells = [r["exact"] for r in retrieval_rows if r["context"] == n and r["method"] == name]
            bpb = next((r for r in bpb_rows if r["context"] == n and r["method"] == name), {})
            attn = next((r for r in attn_rows if r["context"] == n and r["method"] == name), {})
            summary.append(dict(context=n, method=name, fraction=fraction or 1.0,
                                exact_match=float(np.mean(cells)) if cells else None,
                                bits_per_byte=bpb.get("bits_per_byte"), attention_recall=bpb.get("attention_recall"),
                                attention_ms=attn.get("ms"), attention_speedup=attn.get("speedup")))
    table = format_table(summary, [("context", "context", "d"), ("method", "method", "s"),
                                   ("exact_match", "exact", ".2f"), ("bits_per_byte", "bits/byte", ".4f"),
                                   ("attention_recall", "recall", ".4f"), ("attention_ms", "attn ms", ".3f"),
                                   ("attention_speedup", "attn speedup", ".2f")])
    if step_rows:
        table += "\n\nwhole decode step (ms, speedup over dense):\n" + "\n".join(
            f"  {r['context']} {r['method']}: {r['ms']:.1f} ms, {r['speedup']:.2f}x" for r in step_rows)
    metrics = dict(summary=summary, retrieval=retrieval_rows, bits_per_byte=bpb_rows, attention=attn_rows,
                   decode_step=step_rows, seconds=time.perf_counter() - start, machine=machine_info(),
                   dense_layers=list(dense_layers), page_size=PAGE)
    figures = {"density_accuracy": plot(retrieval_rows, bpb_rows, s)}
    return ExperimentResult(metrics=metrics, table=table, figures=figures)
