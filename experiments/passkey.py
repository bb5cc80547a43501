"""Long-context retrieval: exact match over a needle depth x context length grid.

The grid comes from `efficient.data.needle_grid` (filler: held-out documents;
capacity: the model's max_position_embeddings - max_new_tokens, so that every
prompt plus its answer fits), and each context length is evaluated with
`efficient.eval.retrieval_accuracy`, `batch_size` rows of that length per
generate call (one compilation per length and batch shape). Reported: exact
match and digit accuracy per (context, depth) cell, per context length and
overall; whether the issue's target (exact match >= target_exact at every
context length) is met; a heatmap of exact match over depth x context; every
record. Run through `experiments.run` (configs/passkey.py).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient import variants
from efficient.data import TASKS, Example, Tokenizer, needle_grid
from efficient.eval import retrieval_accuracy
from efficient.models import LlamaModel
from experiments.common import ExperimentResult, format_table, load_documents, load_model, load_tokenizer_for


def _positive_int(key: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.{key}: expected a positive int, got {value!r}")
    return int(value)


def _sequence(key: str, value: object) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"config.{key}: expected a non-empty sequence, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"config.{key}: values must be distinct, got {tuple(value)!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The typed settings of a passkey config; validation errors name the config key."""

    model_path: str
    tokenizer: str
    dtype: str
    source: str
    suffixes: tuple[str, ...] | None
    split: str
    task: str
    num_keys: int
    contexts: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    batch_size: int
    max_new_tokens: int
    cache: str
    decoder: str
    target_exact: float
    seed: int

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"config.task: expected one of {sorted(TASKS)}, got {self.task!r}")
        if not 1 <= self.num_keys <= 26:
            raise ValueError(f"config.num_keys: expected an int in [1, 26], got {self.num_keys!r}")
        for d in self.depths:
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"config.depths: expected values in [0, 1], got {self.depths!r}")
        if not 0.0 <= self.target_exact <= 1.0:
            raise ValueError(f"config.target_exact: expected a value in [0, 1], got {self.target_exact!r}")

    @property
    def task_kwargs(self) -> dict[str, int]:
        return {"num_keys": self.num_keys} if self.task == "multikey" else {}


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    """Read a passkey config (the only place that does) into typed settings."""
    contexts = tuple(_positive_int("contexts", n) for n in _sequence("contexts", config.contexts))
    depths = _sequence("depths", config.depths)
    if not all(isinstance(d, (int, float, np.number)) and not isinstance(d, bool) for d in depths):
        raise ValueError(f"config.depths: expected numbers in [0, 1], got {depths!r}")
    target = config.target_exact
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        raise ValueError(f"config.target_exact: expected a number in [0, 1], got {target!r}")
    return Settings(
        model_path=str(config.model.path), tokenizer=str(config.model.tokenizer), dtype=str(config.model.dtype),
        source=str(config.data.source), suffixes=tuple(config.data.suffixes) if config.data.suffixes else None,
        split=str(config.data.split), task=str(config.task), num_keys=_positive_int("num_keys", config.num_keys),
        contexts=contexts, depths=tuple(float(d) for d in depths),
        samples=_positive_int("samples", config.samples), batch_size=_positive_int("batch_size", config.batch_size),
        max_new_tokens=_positive_int("max_new_tokens", config.max_new_tokens),
        cache=str(config.cache), decoder=str(config.decoder), target_exact=float(target),
        seed=int(config.seed),
    )


def select_variants(s: Settings) -> tuple[variants.CacheVariant, variants.DecoderVariant]:
    """The registered cache and decoder named by the settings; ValueError naming the key."""
    try:
        cache = variants.get_cache(s.cache)
    except ValueError as err:
        raise ValueError(f"config.cache: {err}") from err
    try:
        decoder = variants.get_decoder(s.decoder)
    except ValueError as err:
        raise ValueError(f"config.decoder: {err}") from err
    if decoder.needs:
        raise ValueError(f"config.decoder: decoder {s.decoder!r} needs {list(decoder.needs)}, which this "
                         "experiment does not provide; pick one that needs nothing (e.g. 'greedy')")
    return cache, decoder


def check_capacity(s: Settings, max_positions: int) -> int:
    """The longest prompt the model holds with max_new_tokens after it; ValueError naming
    config.contexts when a context length exceeds it."""
    capacity = max_positions - s.max_new_tokens
    too_long = [n for n in s.contexts if n > capacity]
    if too_long:
        raise ValueError(
            f"config.contexts: context lengths {too_long} exceed the model capacity {capacity} "
            f"(max_position_embeddings {max_positions} - config.max_new_tokens {s.max_new_tokens})"
        )
    return capacity


class _Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[passkey {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# Argument names in `efficient.data.tasks` error messages -> the config key that sets them.
_TASK_ARGUMENT_KEYS = {"context_tokens": "config.contexts", "depth": "config.depths", "num_keys": "config.num_keys"}


@dataclasses.dataclass(frozen=True)
class GridItem:
    """One example of the grid and where it sits: context length (as configured) and sample index."""

    context: int
    sample: int
    example: Example


def build_grid(tokenizer: Tokenizer, documents: Sequence[Any], s: Settings, capacity: int,
               log: Callable[[str], None] = print) -> list[GridItem]:
    """Every (context, depth, sample) example, in that order (`needle_grid`'s)."""
    examples = needle_grid(tokenizer, s.contexts, s.depths, task=s.task, samples=s.samples, seed=s.seed,
                           documents=documents, capacity=capacity, **s.task_kwargs)
    items: list[GridItem] = []
    for n in s.contexts:
        try:
            items += [GridItem(n, k, next(examples)) for _ in s.depths for k in range(s.samples)]
        except ValueError as err:  # the task's own messages name its arguments; name the config key
            argument = str(err).split(":", 1)[0]
            key = _TASK_ARGUMENT_KEYS.get(argument, "config.data")
            raise ValueError(f"{key}: cannot build a {s.task} prompt of {n} tokens: {err}") from err
        log(f"built {len(s.depths) * s.samples} {s.task} prompts of <= {n} tokens")
    return items


def evaluate(model: LlamaModel, tokenizer: Tokenizer, grid: Sequence[GridItem], s: Settings,
             cache: variants.CacheVariant, decoder: variants.DecoderVariant,
             log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[int, float]]:
    """A record per grid item (grid order) and the seconds spent per context length."""
    records: list[dict[str, Any]] = []
    seconds: dict[int, float] = {}
    for n in s.contexts:
        items = [g for g in grid if g.context == n]
        start, done = time.perf_counter(), list[dict[str, Any]]()
        batches = range(0, len(items), s.batch_size)
        for b, lo in enumerate(batches):
            chunk = items[lo : lo + s.batch_size]
            found = retrieval_accuracy(model, tokenizer, [g.example for g in chunk], decoder=decoder.fn,
                                       cache=cache.factory, batch_size=s.batch_size,
                                       max_new_tokens=s.max_new_tokens, key=s.seed)
            for g, r in zip(chunk, found.records, strict=True):
                done.append(dict(dataclasses.asdict(r), context=n, sample=g.sample,
                                 needle_token=g.example.needle_token))
            log(f"context {n}: batch {b + 1}/{len(batches)} ({len(done)}/{len(items)} rows), exact so far "
                f"{_mean([float(r['exact']) for r in done]):.2f}, {time.perf_counter() - start:.1f} s")
        records += done
        seconds[n] = time.perf_counter() - start
    return records, seconds


def summarize(records: Sequence[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """Exact match and digit accuracy per cell, per context length and overall; the target check."""
    def stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return dict(exact_match=_mean([float(r["exact"]) for r in rows]),
                    digit_accuracy=_mean([float(r["digits"]) for r in rows]), examples=len(rows))

    cells = []
    for n in s.contexts:
        for d in s.depths:
            rows = [r for r in records if r["context"] == n and r["depth"] == d]
            cells.append(dict(context=n, depth=d, **stats(rows),
                              mean_prompt_tokens=_mean([r["context_tokens"] for r in rows]),
                              mean_needle_token=_mean([r["needle_token"] for r in rows])))
    per_context = {str(n): stats([r for r in records if r["context"] == n]) for n in s.contexts}
    met = {k: v["exact_match"] >= s.target_exact for k, v in per_context.items()}
    return dict(cells=cells, per_context=per_context, overall=stats(records),
                target=dict(exact_match_at_least=s.target_exact, met=met, all_met=all(met.values())))


def heatmap(summary: dict[str, Any], s: Settings, title: str) -> Figure:
    """Exact match (left) and digit accuracy (right) over depth (rows) x context length (columns)."""
    fig = Figure(figsize=(4.5 + 1.6 * len(s.contexts), 1.2 + 0.45 * len(s.depths)))
    axes = fig.subplots(1, 2, squeeze=True)
    for ax, key, name in zip(axes, ("exact_match", "digit_accuracy"), ("exact match", "digit accuracy")):
        grid = np.full((len(s.depths), len(s.contexts)), np.nan)
        for cell in summary["cells"]:
            grid[s.depths.index(cell["depth"]), s.contexts.index(cell["context"])] = cell[key]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(s.contexts)), [str(n) for n in s.contexts])
        ax.set_yticks(range(len(s.depths)), [f"{d:g}" for d in s.depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def table(summary: dict[str, Any], records: Sequence[dict[str, Any]], s: Settings) -> str:
    """Depth rows x context columns (exact / digits), the per-length row, the target, a few outputs."""
    rows: list[dict[str, Any]] = []
    for d in s.depths:
        row: dict[str, Any] = dict(depth=f"{d:g}")
        for cell in summary["cells"]:
            if cell["depth"] == d:
                row[f"e{cell['context']}"], row[f"d{cell['context']}"] = cell["exact_match"], cell["digit_accuracy"]
        rows.append(row)
    last: dict[str, Any] = dict(depth="all")
    for n, v in summary["per_context"].items():
        last[f"e{n}"], last[f"d{n}"] = v["exact_match"], v["digit_accuracy"]
    rows.append(last)
    columns = [("depth", "depth", "")]
    for n in s.contexts:
        columns += [(f"e{n}", f"exact@{n}", ".2f"), (f"d{n}", f"digits@{n}", ".2f")]
    lines = [format_table(rows, columns), ""]
    overall = summary["overall"]
    lines.append(f"overall: exact {overall['exact_match']:.3f}, digits {overall['digit_accuracy']:.3f} "
                 f"over {overall['examples']} examples ({s.task}, {s.decoder} x {s.cache})")
    for n, met in summary["target"]["met"].items():
        lines.append(f"target exact >= {s.target_exact:.2f} at {n}: {'met' if met else 'NOT met'} "
                     f"({summary['per_context'][n]['exact_match']:.3f})")
    for n in s.contexts:
        r = next(r for r in records if r["context"] == n)
        lines.append(f"e.g. context {n}, depth {r['depth']:g}: answer {r['answer']!r} -> output {r['output']!r}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    return dict(platform=platform.platform(), processor=platform.processor(), python=platform.python_version(),
                jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                cpu_count=os.cpu_count(), load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    s = settings_from(config)
    cache, decoder = select_variants(s)
    log = _Log()
    model = load_model(s.model_path, dtype=s.dtype)
    capacity = check_capacity(s, model.config.max_position_embeddings)
    tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
    documents = load_documents(s.source, s.suffixes, s.split)
    log(f"model {s.model_path} ({model.config.num_parameters() / 1e6:.2f}M parameters, {s.dtype}, "
        f"{model.config.max_position_embeddings} positions), {tokenizer!r}, {len(documents)} {s.split} documents")
    start = time.perf_counter()
    grid = build_grid(tokenizer, documents, s, capacity, log)
    build_seconds = time.perf_counter() - start
    records, seconds = evaluate(model, tokenizer, grid, s, cache, decoder, log)
    summary = summarize(records, s)
    for n, v in summary["per_context"].items():
        log(f"context {n}: exact {v['exact_match']:.3f}, digits {v['digit_accuracy']:.3f} ({seconds[int(n)]:.1f} s)")
    metrics: dict[str, Any] = dict(
        task=s.task, contexts=list(s.contexts), depths=list(s.depths), samples=s.samples, cache=s.cache,
        decoder=s.decoder, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, capacity=capacity,
        **summary,
        seconds=dict(build_prompts=build_seconds, evaluate={str(n): t for n, t in seconds.items()}),
        model=dict(path=s.model_path, parameters=model.config.num_parameters(), dtype=s.dtype,
                   max_position_embeddings=model.config.max_position_embeddings, tokenizer=repr(tokenizer)),
        machine=machine_info(),
        records=records,
    )
    title = (f"{s.task} retrieval: {s.model_path} ({model.config.num_parameters() / 1e6:.1f}M), "
             f"{s.decoder} x {s.cache}, {s.samples} per cell")
    return ExperimentResult(metrics=metrics, table=table(summary, records, s),
                            figures={"heatmap": heatmap(summary, s, title)})
