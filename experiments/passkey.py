"""Long-context retrieval: exact match over a needle depth x context length grid, per task.

For each task of `config.tasks` (e.g. `classic_passkey`, the Mohtashami & Jaggi
2023 passkey prompt, and `kv_prose`, KEY-dddd lines in English prose; see
`efficient.data.tasks`) the grid comes from `efficient.data.needle_grid`
(filler: each task's own, or `config.data`'s documents; capacity: the model's
max_position_embeddings - max_new_tokens, so that every prompt plus its answer
fits), and each context length is evaluated with
`efficient.eval.retrieval_accuracy`, `batch_size` rows of that length per
generate call (one compilation per length and batch shape). Reported per task:
exact match and digit accuracy per (context, depth) cell, per context length
and overall; whether the target (exact match >= target_exact at every context
length) is met; a heatmap of depth x context (a row of panels per task); every
record. Run through `experiments.run` (configs/passkey.py).

`config.model.backend`: "efficient" (our JAX model through
`experiments.common.load_model`) or "transformers" (the same checkpoint or
GGUF file through Hugging Face transformers and torch, greedy, one row at a
time: the reference the library is checked against).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient import variants
from efficient.data import TASKS, Example, Tokenizer, needle_grid
from efficient.data.tasks import KV_STYLES
from efficient.decoding import GenerateOutput, GenerateStats
from efficient.eval import retrieval_accuracy
from experiments.common import ExperimentResult, format_table, load_documents, load_model, load_tokenizer_for

BACKENDS = ("efficient", "transformers")
# Tasks whose needle count `config.num_keys` sets (0: the task's default).
_KEYED_TASKS = ("multikey", "kv_prose")


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
    backend: str
    torch_threads: int
    source: str
    suffixes: tuple[str, ...] | None
    split: str
    tasks: tuple[str, ...]
    num_keys: int
    kv_style: str
    contexts: tuple[int, ...]
    depths: tuple[float, ...]
    samples: tuple[int, ...]  # per context length
    batch_size: int
    max_new_tokens: int
    cache: str
    decoder: str
    target_exact: float
    seed: int

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"config.tasks: expected names from {sorted(TASKS)}, got {self.tasks!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"config.model.backend: expected one of {BACKENDS}, got {self.backend!r}")
        if not 0 <= self.num_keys <= 100:
            raise ValueError(f"config.num_keys: expected an int in [0, 100] (0: the task's default), "
                             f"got {self.num_keys!r}")
        if self.kv_style not in KV_STYLES:
            raise ValueError(f"config.kv_style: expected one of {sorted(KV_STYLES)}, got {self.kv_style!r}")
        for d in self.depths:
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"config.depths: expected values in [0, 1], got {self.depths!r}")
        if not 0.0 <= self.target_exact <= 1.0:
            raise ValueError(f"config.target_exact: expected a value in [0, 1], got {self.target_exact!r}")

    def task_kwargs(self, task: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_keys": self.num_keys} if task in _KEYED_TASKS and self.num_keys else {}
        if task == "kv_prose":
            kwargs["style"] = self.kv_style
        return kwargs


def _int(key: str, value: object, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.{key}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _samples(value: object, count: int) -> tuple[int, ...]:
    """config.samples: one positive int for every context length, or one per context length."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (_positive_int("samples", value),) * count
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == count:
        return tuple(_positive_int("samples", k) for k in value)
    raise ValueError(f"config.samples: expected a positive int or one per context length ({count}), got {value!r}")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    """Read a passkey config (the only place that does) into typed settings."""
    contexts = tuple(_positive_int("contexts", n) for n in _sequence("contexts", config.contexts))
    depths = _sequence("depths", config.depths)
    if not all(isinstance(d, (int, float, np.number)) and not isinstance(d, bool) for d in depths):
        raise ValueError(f"config.depths: expected numbers in [0, 1], got {depths!r}")
    target = config.target_exact
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        raise ValueError(f"config.target_exact: expected a number in [0, 1], got {target!r}")
    tasks = (config.tasks,) if isinstance(config.tasks, str) else _sequence("tasks", config.tasks)
    return Settings(
        model_path=str(config.model.path), tokenizer=str(config.model.tokenizer), dtype=str(config.model.dtype),
        backend=str(config.model.backend), torch_threads=_int("model.torch_threads", config.model.torch_threads, 0),
        source=str(config.data.source), suffixes=tuple(config.data.suffixes) if config.data.suffixes else None,
        split=str(config.data.split), tasks=tuple(str(t) for t in tasks),
        num_keys=_int("num_keys", config.num_keys, 0), kv_style=str(config.kv_style),
        contexts=contexts, depths=tuple(float(d) for d in depths),
        samples=_samples(config.samples, len(contexts)), batch_size=_positive_int("batch_size", config.batch_size),
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
_TASK_ARGUMENT_KEYS = {"context_tokens": "config.contexts", "depth": "config.depths", "num_keys": "config.num_keys",
                       "style": "config.kv_style"}


@dataclasses.dataclass(frozen=True)
class GridItem:
    """One example of the grid and where it sits: context length (as configured) and sample index."""

    context: int
    sample: int
    example: Example


def build_grid(tokenizer: Tokenizer, documents: Sequence[Any] | None, s: Settings, capacity: int, task: str,
               log: Callable[[str], None] = print) -> list[GridItem]:
    """Every (context, depth, sample) example of `task`, in that order (`needle_grid`'s).
    `documents=None`: the task's own filler."""
    for n in s.contexts:  # validate every length before building any prompt
        needle_grid(tokenizer, [n], s.depths, task=task, documents=documents, capacity=capacity)
    items: list[GridItem] = []
    for n, samples in zip(s.contexts, s.samples, strict=True):
        try:  # a cell's examples do not depend on the rest of the grid: one call per length
            examples = needle_grid(tokenizer, [n], s.depths, task=task, samples=samples, seed=s.seed,
                                   documents=documents, capacity=capacity, **s.task_kwargs(task))
            items += [GridItem(n, k, next(examples)) for _ in s.depths for k in range(samples)]
        except ValueError as err:  # the task's own messages name its arguments; name the config key
            argument = str(err).split(":", 1)[0]
            key = _TASK_ARGUMENT_KEYS.get(argument, "config.data")
            raise ValueError(f"{key}: cannot build a {task} prompt of {n} tokens: {err}") from err
        log(f"built {len(s.depths) * samples} {task} prompts of <= {n} tokens")
    return items


Decoder = Callable[..., GenerateOutput]


def evaluate(model: Any, tokenizer: Tokenizer, grid: Sequence[GridItem], s: Settings, decoder: Decoder,
             cache: Callable[..., Any] | None, log: Callable[[str], None] = print
             ) -> tuple[list[dict[str, Any]], dict[int, float]]:
    """A record per grid item (grid order) and the seconds spent per context length."""
    records: list[dict[str, Any]] = []
    seconds: dict[int, float] = {}
    for n in s.contexts:
        items = [g for g in grid if g.context == n]
        start, done = time.perf_counter(), list[dict[str, Any]]()
        batches = range(0, len(items), s.batch_size)
        for b, lo in enumerate(batches):
            chunk = items[lo : lo + s.batch_size]
            found = retrieval_accuracy(model, tokenizer, [g.example for g in chunk], decoder=decoder,
                                       cache=cache, batch_size=s.batch_size,
                                       max_new_tokens=s.max_new_tokens, key=s.seed)
            for g, r in zip(chunk, found.records, strict=True):
                done.append(dict(dataclasses.asdict(r), context=n, sample=g.sample,
                                 needle_token=g.example.needle_token))
                log(f"  {r.task} {n} depth {r.depth:g} sample {g.sample}: answer {r.answer} -> {r.output!r} "
                    f"{'ok' if r.exact else 'MISS'}")
            task = chunk[0].example.task
            log(f"{task} context {n}: batch {b + 1}/{len(batches)} ({len(done)}/{len(items)} rows), exact so far "
                f"{_mean([float(r['exact']) for r in done]):.2f}, {time.perf_counter() - start:.1f} s")
        records += done
        seconds[n] = time.perf_counter() - start
    return records, seconds


def summarize(records: Sequence[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """One task's exact match and digit accuracy per cell, per context length and overall; the target."""
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


def heatmap(summaries: dict[str, dict[str, Any]], s: Settings, title: str) -> Figure:
    """Per task (rows of panels): exact match and digit accuracy over depth x context length."""
    fig = Figure(figsize=(4.5 + 1.6 * len(s.contexts), (1.2 + 0.45 * len(s.depths)) * len(summaries) + 0.4))
    axes = fig.subplots(len(summaries), 2, squeeze=False)
    for row, (task, summary) in zip(axes, summaries.items()):
        for ax, key, name in zip(row, ("exact_match", "digit_accuracy"), ("exact match", "digit accuracy")):
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
            ax.set_title(f"{task}: {name}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def table(task: str, summary: dict[str, Any], records: Sequence[dict[str, Any]], s: Settings, stack: str) -> str:
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
    lines = [f"== {task}", format_table(rows, columns), ""]
    overall = summary["overall"]
    lines.append(f"overall: exact {overall['exact_match']:.3f}, digits {overall['digit_accuracy']:.3f} "
                 f"over {overall['examples']} examples ({task}, {stack})")
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


# ---- the transformers backend (reference) ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TorchConfig:
    """What `retrieval_accuracy` and this experiment read from a model's config."""

    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    parameters: int

    def num_parameters(self) -> int:
        return self.parameters


@dataclasses.dataclass(frozen=True)
class TorchModel:
    """A transformers causal LM behind the `config` attribute our evaluation reads."""

    module: Any
    config: _TorchConfig


class TransformersTokenizer:
    """A transformers tokenizer as our `Tokenizer` protocol (no special tokens added on encode)."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def num_bytes(self, ids: Sequence[int]) -> int:
        return len(self.decode(ids).encode("utf-8"))

    def __repr__(self) -> str:
        return f"TransformersTokenizer({type(self.hf).__name__}, vocab {self.vocab_size})"


def _resolve(path: str) -> Path:
    try:
        from efficient.models import resolve_model_path  # packaged short names such as "smollm2"
    except ImportError:  # pragma: no cover - older library
        return Path(path)
    return resolve_model_path(path)


def load_transformers(path: str, dtype: str, threads: int) -> tuple[TorchModel, TransformersTokenizer]:
    """An HF folder or a .gguf file (or a packaged model's name) through transformers and torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting threads slow shared machines 10x
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    file = _resolve(path)
    if not file.exists():
        raise FileNotFoundError(f"config.model.path: {path!r} is neither a packaged model, a folder nor a file")
    where = dict(pretrained_model_name_or_path=str(file.parent), gguf_file=file.name) if file.is_file() else \
        dict(pretrained_model_name_or_path=str(file))
    module = AutoModelForCausalLM.from_pretrained(**where, dtype=getattr(torch, dtype)).eval()
    tokenizer = TransformersTokenizer(AutoTokenizer.from_pretrained(**where))
    c = module.config
    eos = c.eos_token_id if isinstance(c.eos_token_id, (list, tuple)) else [c.eos_token_id]
    config = _TorchConfig(int(c.vocab_size), int(c.max_position_embeddings),
                          tuple(int(e) for e in eos if e is not None),
                          int(sum(p.numel() for p in module.parameters())))
    return TorchModel(module, config), tokenizer


def torch_greedy(model: TorchModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_tokens: Sequence[int] = (), **_: Any) -> GenerateOutput:
    """Greedy decoding with transformers' `generate`, one row at a time (no padding), as a
    `GenerateOutput` like our decoders'."""
    import torch

    rows, stopped, prefill = [], [], 0.0
    with torch.inference_mode():
        for p in prompts:
            start = time.perf_counter()
            ids = torch.tensor([list(p)])
            out = model.module.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=list(stop_tokens) or None,
                                        pad_token_id=(list(stop_tokens) or [0])[0])
            prefill += time.perf_counter() - start
            row = out[0, ids.shape[1]:].tolist()
            hit = next((i for i, t in enumerate(row) if t in stop_tokens), None)
            rows.append(row if hit is None else row[: hit + 1])
            stopped.append(hit is not None)
    tokens = np.zeros((len(rows), max_new_tokens), np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    stats = GenerateStats(len(rows) * max_new_tokens, sum(map(len, prompts)), sum(map(len, rows)), prefill, 0.0,
                          batch_size=len(rows))
    return GenerateOutput(tokens, np.array([len(r) for r in rows]), np.array(stopped), stats)


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    s = settings_from(config)
    log = _Log()
    if s.backend == "efficient":
        cache, decoder = select_variants(s)
        model: Any = load_model(s.model_path, dtype=s.dtype)
        tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
        decode, cache_factory, stack = decoder.fn, cache.factory, f"efficient, {s.decoder} x {s.cache}"
    else:
        model, tokenizer = load_transformers(s.model_path, s.dtype, s.torch_threads)
        decode, cache_factory, stack = torch_greedy, None, "transformers greedy"
    capacity = check_capacity(s, model.config.max_position_embeddings)
    documents = None if s.source == "default" else load_documents(s.source, s.suffixes, s.split)
    log(f"model {s.model_path} ({model.config.num_parameters() / 1e6:.2f}M parameters, {s.dtype}, "
        f"{model.config.max_position_embeddings} positions, {s.backend}), {tokenizer!r}, filler: "
        + ("each task's own" if documents is None else f"{len(documents)} {s.split} documents"))
    summaries: dict[str, dict[str, Any]] = {}
    all_records: list[dict[str, Any]] = []
    build_seconds: dict[str, float] = {}
    eval_seconds: dict[str, dict[str, float]] = {}
    tables = []
    for task in s.tasks:
        start = time.perf_counter()
        grid = build_grid(tokenizer, documents, s, capacity, task, log)
        build_seconds[task] = time.perf_counter() - start
        records, seconds = evaluate(model, tokenizer, grid, s, decode, cache_factory, log)
        summaries[task] = summarize(records, s)
        for n, v in summaries[task]["per_context"].items():
            log(f"{task} context {n}: exact {v['exact_match']:.3f}, digits {v['digit_accuracy']:.3f} "
                f"({seconds[int(n)]:.1f} s)")
        all_records += records
        eval_seconds[task] = {str(n): t for n, t in seconds.items()}
        tables.append(table(task, summaries[task], records, s, stack))
    metrics: dict[str, Any] = dict(
        tasks=list(s.tasks), contexts=list(s.contexts), depths=list(s.depths), samples=list(s.samples),
        backend=s.backend, cache=s.cache, decoder=s.decoder, stack=stack, max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size, capacity=capacity, task_kwargs={t: s.task_kwargs(t) for t in s.tasks},
        results=summaries,
        all_met=all(v["target"]["all_met"] for v in summaries.values()),
        seconds=dict(build_prompts=build_seconds, evaluate=eval_seconds),
        model=dict(path=s.model_path, parameters=model.config.num_parameters(), dtype=s.dtype,
                   max_position_embeddings=model.config.max_position_embeddings, tokenizer=repr(tokenizer)),
        machine=machine_info(),
        records=all_records,
    )
    title = (f"retrieval: {s.model_path} ({model.config.num_parameters() / 1e6:.1f}M, {s.backend}), "
             f"{stack}, {'/'.join(map(str, s.samples))} per cell")
    return ExperimentResult(metrics=metrics, table="\n\n".join(tables),
                            figures={"heatmap": heatmap(summaries, s, title)})
