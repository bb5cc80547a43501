"""Quickstart: every registered decoder x cache on one model, side by side.

Quality: bits/byte of held-out text through each cache (chunked prefill),
agreement of each pair's completions with greedy + dense, and passkey
retrieval accuracy. Speed: time to first token and decode tokens/s (median
of `repeats` runs after a compiling warm-up). Memory: bytes the cache holds
for the generation batch. Variants come from `efficient.variants`, so a newly
registered one appears here without changes. Run through `experiments.run`.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient import variants
from efficient.data import Document, Tokenizer, eval_windows, needle_grid
from efficient.decoding import capacity_bucket
from efficient.eval import (
    cache_memory,
    measure_generation,
    perplexity,
    prefix_agreement,
    retrieval_accuracy,
    select_windows,
)
from efficient.models import LlamaModel
from experiments.common import (
    ExperimentResult,
    check_positive,
    code_prompts,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    num_prompts: int
    prompt_tokens: int
    max_new_tokens: int
    repeats: int

    def __post_init__(self) -> None:
        check_positive(self, "num_prompts", "prompt_tokens", "max_new_tokens", "repeats")


@dataclasses.dataclass(frozen=True)
class PerplexitySettings:
    seq_len: int
    max_windows: int
    batch_size: int
    chunk: int

    def __post_init__(self) -> None:
        check_positive(self, "seq_len", "max_windows", "batch_size", "chunk")


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    task: str
    context_tokens: int
    depths: tuple[float, ...]
    samples: int
    batch_size: int
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        check_positive(self, "context_tokens", "samples", "batch_size", "max_new_tokens")


PAIRINGS = ("each", "all")


def selected_pairs(decoders: list[Any], caches: list[Any], pairs: str) -> list[tuple[Any, Any]]:
    """(decoder, cache) pairs to run: "all" = every pair; "each" = every cache under the first
    decoder (greedy) and every decoder on the first cache (dense), each pair once."""
    if pairs == "all" or not decoders or not caches:
        return [(d, c) for d in decoders for c in caches]
    chosen = [(decoders[0], c) for c in caches] + [(d, caches[0]) for d in decoders[1:]]
    return chosen


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    tokenizer: str
    dtype: str
    draft_path: str
    draft_dtype: str
    source: str
    suffixes: tuple[str, ...] | None
    split: str
    seed: int
    generation: GenerationSettings
    perplexity: PerplexitySettings
    retrieval: RetrievalSettings
    decoders: str
    caches: str
    pairs: str = "each"
    layer_loop: str = "scan"

    def __post_init__(self) -> None:
        if self.pairs not in PAIRINGS:
            raise ValueError(f"config.variants.pairs: expected one of {PAIRINGS}, got {self.pairs!r}")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    """The typed settings of a quickstart config (the only place that reads it)."""
    return Settings(
        model_path=str(config.model.path), tokenizer=config.model.tokenizer, dtype=config.model.dtype,
        layer_loop=config.model.layer_loop, draft_path=str(config.draft.path), draft_dtype=config.draft.dtype,
        source=config.data.source, suffixes=tuple(config.data.suffixes) if config.data.suffixes else None,
        split=config.data.split, seed=int(config.seed),
        generation=GenerationSettings(**config.generation.to_dict()),
        perplexity=PerplexitySettings(**config.perplexity.to_dict()),
        retrieval=RetrievalSettings(**{**config.retrieval.to_dict(), "depths": tuple(config.retrieval.depths)}),
        decoders=config.variants.decoders, caches=config.variants.caches, pairs=config.variants.pairs,
    )


class _Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[quickstart {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def compare(model: LlamaModel, tokenizer: Tokenizer, documents: list[Document], s: Settings,
            resources: dict[str, Callable[[], Any]], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every selected (decoder, cache) pair; returns the metrics dict."""
    config = model.config
    g, p, r = s.generation, s.perplexity, s.retrieval
    limit = config.max_position_embeddings
    if g.prompt_tokens + g.max_new_tokens > limit:
        raise ValueError(f"generation: prompt_tokens {g.prompt_tokens} + max_new_tokens {g.max_new_tokens} "
                         f"exceeds the model's max_position_embeddings {limit}")
    caches, decoders = variants.caches(s.caches), variants.decoders(s.decoders)
    prompts = code_prompts(documents, tokenizer, g.num_prompts, g.prompt_tokens, s.seed)
    windows = select_windows(eval_windows(documents, tokenizer, p.seq_len), tokenizer, p.max_windows)
    examples = list(needle_grid(tokenizer, [r.context_tokens], r.depths, task=r.task, samples=r.samples,
                                seed=s.seed, documents=documents, capacity=limit - r.max_new_tokens))
    capacity = capacity_bucket(g.prompt_tokens + g.max_new_tokens, 64)  # generate's default

    def ppl_progress(done: int, total: int) -> None:
        if done == total:
            log(f"  bits/byte: {total} windows of {p.seq_len} tokens")

    reference = perplexity(model, windows, batch_size=p.batch_size, progress=ppl_progress)
    log(f"cacheless bits/byte {reference.bits_per_byte:.4f} over {reference.tokens} tokens")
    cache_rows: dict[str, dict[str, Any]] = {}
    for c in caches:
        q = perplexity(model, windows, cache=c.factory, chunk=p.chunk, batch_size=p.batch_size)
        mem = cache_memory(c.factory, config, g.num_prompts, capacity)
        cache_rows[c.name] = dict(quality=q.as_dict(), memory=mem.as_dict())
        log(f"cache {c.name}: bits/byte {q.bits_per_byte:.4f}, {mem.mebibytes:.2f} MiB")

    rows, outputs, skipped = [], {}, {}
    ready: dict[str, dict[str, Any]] = {}
    for d, c in selected_pairs(decoders, caches, s.pairs):
        if d.name in skipped:
            continue
        if d.name not in ready:
            options: dict[str, Any] = {}
            try:
                for need in d.needs:
                    if need not in resources:
                        raise LookupError(f"the harness provides {sorted(resources)}, not {need!r}")
                    options[need] = resources[need]()
            except (LookupError, FileNotFoundError) as err:
                skipped[d.name] = str(err)
                log(f"decoder {d.name}: skipped ({err})")
                continue
            ready[d.name] = options
        options = ready[d.name]
        log(f"{d.name} x {c.name}: generating")
        speed = measure_generation(d.fn, model, prompts, max_new_tokens=g.max_new_tokens, repeats=g.repeats,
                                   cache=c.factory, key=s.seed, stop_tokens=(), **options)
        found = retrieval_accuracy(model, tokenizer, examples, decoder=d.fn, cache=c.factory,
                                   batch_size=r.batch_size, max_new_tokens=r.max_new_tokens, key=s.seed,
                                   **options)
        outputs[(d.name, c.name)] = speed.output.sequences()
        quality = cache_rows[c.name]["quality"]
        memory = cache_rows[c.name]["memory"]
        rows.append(dict(
            decoder=d.name, cache=c.name, lossless=d.lossless and c.lossless,
            bits_per_byte=quality["bits_per_byte"], retrieval_exact=found.exact_match,
            retrieval_digits=found.digit_accuracy, ttft_ms=1e3 * speed.time_to_first_token,
            decode_tokens_per_s=speed.decode_tokens_per_second, tokens_per_s=speed.tokens_per_second,
            target_forwards=speed.target_forwards, cache_bytes=memory["bytes"],
            cache_mib=memory["bytes"] / 2**20, cache_bytes_per_token=memory["bytes_per_token"],
            completion=tokenizer.decode(outputs[(d.name, c.name)][0]),
        ))
        log(f"{d.name} x {c.name}: {speed.decode_tokens_per_second:.1f} tok/s, "
            f"ttft {1e3 * speed.time_to_first_token:.1f} ms, passkey {found.exact_match:.2f}")
    ref_key = ("greedy", "dense") if ("greedy", "dense") in outputs else next(iter(outputs), None)
    for row in rows:
        row["agreement"] = (prefix_agreement(outputs[ref_key], outputs[(row["decoder"], row["cache"])])
                            if ref_key else float("nan"))
    return dict(
        reference_pair=list(ref_key) if ref_key else None,
        cacheless=reference.as_dict(),
        caches={c.name: dict(cache_rows[c.name], lossless=c.lossless, description=c.description,
                             paper=c.paper) for c in caches},
        decoders={d.name: dict(lossless=d.lossless, sampling=d.sampling, description=d.description,
                               paper=d.paper, needs=list(d.needs)) for d in decoders},
        skipped=skipped,
        rows=rows,
        prompts=[tokenizer.decode(x) for x in prompts],
        generation_capacity=capacity,
        retrieval=dict(task=r.task, context_tokens=r.context_tokens, depths=list(r.depths),
                       examples=len(examples)),
    )


COLUMNS = (
    ("decoder", "decoder", ""), ("cache", "cache", ""), ("lossless", "lossless", ""),
    ("bits_per_byte", "bits/byte", ".4f"), ("agreement", "agree", ".2f"),
    ("retrieval_exact", "passkey", ".2f"), ("ttft_ms", "ttft ms", ".1f"),
    ("decode_tokens_per_s", "decode tok/s", ".1f"), ("cache_mib", "cache MiB", ".3f"),
)

PANELS = (
    ("bits_per_byte", "bits/byte (lower is better)"), ("agreement", "agreement with greedy+dense"),
    ("retrieval_exact", "passkey exact match"), ("ttft_ms", "time to first token (ms)"),
    ("decode_tokens_per_s", "decode tokens/s"), ("cache_mib", "cache memory (MiB)"),
)


def plot(rows: list[dict[str, Any]], title: str) -> Figure:
    """One bar panel per metric, one bar per (decoder, cache) pair."""
    fig = Figure(figsize=(13, 7))
    labels = [f"{r['decoder']}\n{r['cache']}" for r in rows]
    colors = ["tab:blue" if r["lossless"] else "tab:orange" for r in rows]
    for i, (key, name) in enumerate(PANELS):
        ax = fig.add_subplot(2, 3, i + 1)
        values = [float(r[key]) for r in rows]
        bars = ax.bar(np.arange(len(rows)), values, color=colors)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if key in ("agreement", "retrieval_exact"):
            ax.set_ylim(0, 1.1)
        elif key == "bits_per_byte" and values and min(values) > 0:  # differences are small: zoom in
            ax.set_ylim(0.95 * min(values), 1.02 * max(values))
        ax.set_xticks(np.arange(len(rows)), labels, fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title}  (blue: lossless, orange: lossy)", fontsize=10)
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    s = settings_from(config)
    log = _Log()
    model = load_model(s.model_path, dtype=s.dtype, layer_loop=s.layer_loop)
    tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
    documents = load_documents(s.source, s.suffixes, s.split)
    log(f"model {s.model_path} ({model.config.num_parameters() / 1e6:.2f}M parameters, {s.dtype}), "
        f"{tokenizer!r}, {len(documents)} {s.split} documents")
    draft: dict[str, Any] = {}

    def draft_model() -> Any:
        if not s.draft_path:
            raise LookupError("no draft model configured (config.draft.path is empty)")
        if "model" not in draft:
            draft["model"] = load_model(s.draft_path, dtype=s.draft_dtype, key="config.draft.path")
        return draft["model"]

    def calibration_tokens() -> Any:  # held-out text, other lines than the prompts (self-speculative calibration)
        g = s.generation
        return np.asarray(code_prompts(documents, tokenizer, 2, g.prompt_tokens, s.seed + 1), np.int32)

    metrics = compare(model, tokenizer, documents, s,
                      {"draft_model": draft_model, "calibration_tokens": calibration_tokens}, log)
    metrics["model"] = dict(path=s.model_path, parameters=model.config.num_parameters(), dtype=s.dtype,
                            tokenizer=repr(tokenizer), vocab_size=model.config.vocab_size)
    metrics["machine"] = dict(platform=platform.platform(), backend=jax.default_backend(),
                              device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    rows = metrics["rows"]
    table = format_table(rows, COLUMNS)
    if rows:
        table += f"\n\nprompt 0 (end) -> completion by {rows[0]['decoder']} x {rows[0]['cache']}:\n"
        table += repr(metrics["prompts"][0][-120:]) + "\n  -> " + repr(rows[0]["completion"])
    for name, reason in metrics["skipped"].items():
        table += f"\nskipped decoder {name}: {reason}"
    title = f"quickstart: {s.model_path} ({model.config.num_parameters() / 1e6:.1f}M)"
    return ExperimentResult(metrics=metrics, table=table, figures={"quickstart": plot(rows, title)})
