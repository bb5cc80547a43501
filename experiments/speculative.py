"""Speculative decoding benchmark (Spec-Bench style) on held-out stdlib code.

For each task kind (`efficient.data.code_tasks`: completion, repetitive code,
function editing) and batch size, plain greedy decoding (the registry's
"greedy") and every selected decoder run on the same prompts, in one process:
batch size b splits the prompts into consecutive groups of b (batch 1: each
prompt alone), and one *pass* runs every group. After `warmup` passes per
method (compilation), `repeats` passes are timed, the methods interleaved
within each repeat so that load drifts on a shared machine hit all alike; each
time is the median over repeats of the pass's sum over groups.

Reported per (task, batch, decoder): end-to-end time (prefill + decode, from
the decoder's `GenerateStats`), decode-only time, wall time of the calls
(which also counts building the drafter), speedup = greedy time / method time
for each, mean accepted tokens per verification (`SpeculativeStats`), target
forwards, acceptance by depth, and whether the output equals greedy's
(lossless greedy decoders must; reported, not asserted). Decoders' `needs`
are served from "draft_model", "calibration_tokens", "medusa_heads"
(config.medusa.path) and "feature_drafter" (config.eagle.path); a decoder needing
anything else is skipped with the reason. Run through `experiments.run`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient import variants
from efficient.data import Tokenizer
from efficient.data.code_tasks import TASK_KINDS, CodePrompt, build_prompts, completion_prompts
from efficient.decoding import GenerateOutput
from efficient.decoding.drafters import LoadedFeatureDrafter, LoadedHeads, load_feature_drafter, load_medusa_heads
from efficient.decoding.speculative_variants import width_choices
from efficient.eval import prefix_agreement
from efficient.models import LlamaModel
from experiments.common import (
    ExperimentResult,
    check_positive,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
    machine_info,
)

BASELINES = ("greedy", "sample")


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    kinds: tuple[str, ...]
    prompts_per_kind: int
    prompt_tokens: int
    editing_max_tokens: int
    editing_min_lines: int

    def __post_init__(self) -> None:
        check_positive(self, "prompts_per_kind", "prompt_tokens", "editing_max_tokens", "editing_min_lines")
        bad = [k for k in self.kinds if k not in TASK_KINDS]
        if not self.kinds or bad or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"config.tasks.kinds: expected distinct names among {TASK_KINDS}, got {self.kinds!r}")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    batch_sizes: tuple[int, ...]
    repeats: int
    warmup: int

    def __post_init__(self) -> None:
        check_positive(self, "max_new_tokens", "repeats")
        check_positive(self, "warmup", minimum=0)
        if not self.batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1
                                       for b in self.batch_sizes):
            raise ValueError(f"config.generation.batch_sizes: expected positive ints, got {self.batch_sizes!r}")


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    split: str
    rows: int
    tokens: int

    def __post_init__(self) -> None:
        check_positive(self, "rows", "tokens")


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    transformers: bool  # also time transformers' generate(prompt_lookup_num_tokens=...) at batch 1
    prompt_lookup_num_tokens: int
    threads: int

    def __post_init__(self) -> None:
        check_positive(self, "prompt_lookup_num_tokens", "threads")


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    tokenizer: str
    dtype: str
    layer_loop: str
    draft_path: str
    draft_dtype: str
    medusa_path: str
    medusa_tree_sizes: tuple[int, ...]
    eagle_path: str
    eagle_tree_sizes: tuple[int, ...]
    source: str
    suffixes: tuple[str, ...] | None
    split: str
    seed: int
    tasks: TaskSettings
    generation: GenerationSettings
    calibration: CalibrationSettings
    decoders: str
    peer: PeerSettings

    def __post_init__(self) -> None:
        for name, sizes in (("medusa", self.medusa_tree_sizes), ("eagle", self.eagle_tree_sizes)):
            for w in sizes:
                if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                    raise ValueError(f"config.{name}.tree_sizes: each size must be an int >= 1, got {w!r}")
        for b in self.generation.batch_sizes:
            if self.tasks.prompts_per_kind % b:
                raise ValueError(f"config.generation.batch_sizes: {b} does not divide "
                                 f"config.tasks.prompts_per_kind {self.tasks.prompts_per_kind}")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    """The typed settings of a speculative config (the only place that reads it)."""
    gen = config.generation
    return Settings(
        model_path=str(config.model.path), tokenizer=config.model.tokenizer, dtype=config.model.dtype,
        layer_loop=config.model.layer_loop, draft_path=str(config.draft.path), draft_dtype=config.draft.dtype,
        medusa_path=str(config.medusa.path), medusa_tree_sizes=tuple(config.medusa.tree_sizes),
        eagle_path=str(config.eagle.path), eagle_tree_sizes=tuple(config.eagle.tree_sizes),
        source=config.data.source,
        suffixes=tuple(config.data.suffixes) if config.data.suffixes else None,
        split=config.data.split, seed=int(config.seed),
        tasks=TaskSettings(**{**config.tasks.to_dict(), "kinds": tuple(config.tasks.kinds)}),
        generation=GenerationSettings(max_new_tokens=gen.max_new_tokens, batch_sizes=tuple(gen.batch_sizes),
                                      repeats=gen.repeats, warmup=gen.warmup),
        calibration=CalibrationSettings(**config.calibration.to_dict()),
        decoders=config.decoders,
        peer=PeerSettings(**config.peer.to_dict()),
    )


def select_decoders(names: str) -> list[variants.DecoderVariant]:
    """"all": every registered decoder but the baselines; else the named ones (greedy, the
    reference, is dropped: it always runs)."""
    if not isinstance(names, str):
        raise TypeError(f"config.decoders: expected a comma-separated string, got {names!r}")
    if names.strip() == "all":
        return [d for d in variants.decoders() if d.name not in BASELINES]
    try:
        chosen = variants.decoders(names)
    except ValueError as err:
        raise ValueError(f"config.decoders: {err}") from err
    return [d for d in chosen if d.name != "greedy"]


def with_fixed_sizes(decoders: list[variants.DecoderVariant],
                     sizes: dict[str, tuple[int, ...]]) -> list[variants.DecoderVariant]:
    """Each decoder named in `sizes` (tree sized by goodput) followed by one fixed-size copy per
    size (`<name>_w<size>`), to check the goodput choice against measured speed."""
    out = []
    for d in decoders:
        out.append(d)
        out += [dataclasses.replace(d, name=f"{d.name}_w{w}", fn=functools.partial(d.fn, tree_size=w),
                                    description=f"{d.description} (fixed at {w} nodes)")
                for w in sizes.get(d.name, ())]
    return out


@dataclasses.dataclass
class _Method:
    name: str
    fn: Callable[..., GenerateOutput]
    options: dict[str, Any]
    times: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)  # prefill, decode, wall
    outputs: list[GenerateOutput] = dataclasses.field(default_factory=list)
    error: str = ""


def _pass(method: _Method, model: LlamaModel, groups: list[list[list[int]]], max_new: int, seed: int) -> None:
    """One pass over the groups: records (prefill, decode, wall) sums and the outputs."""
    outputs, wall = [], 0.0
    for group in groups:
        start = time.perf_counter()
        outputs.append(method.fn(model, group, max_new_tokens=max_new, cache=None, key=seed, stop_tokens=(),
                                 **method.options))
        wall += time.perf_counter() - start
    method.times.append((sum(o.stats.prefill_seconds for o in outputs),
                         sum(o.stats.decode_seconds for o in outputs), wall))
    method.outputs = outputs


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _summary(method: _Method, warmup: int) -> dict[str, Any]:
    timed = method.times[warmup:]
    prefill = statistics.median(t[0] for t in timed)
    decode = statistics.median(t[1] for t in timed)
    e2e = statistics.median(t[0] + t[1] for t in timed)
    wall = statistics.median(t[2] for t in timed)
    stats = [o.stats for o in method.outputs]
    generated = sum(s.generated_tokens for s in stats)
    forwards = sum(s.target_forwards for s in stats)
    row = dict(prefill_seconds=prefill, decode_seconds=decode, e2e_seconds=e2e, wall_seconds=wall,
               e2e_repeats=[t[0] + t[1] for t in timed], generated_tokens=generated, target_forwards=forwards,
               tokens_per_second=generated / max(e2e, 1e-9),
               decode_tokens_per_second=sum(s.generated_tokens - s.batch_size for s in stats) / max(decode, 1e-9),
               mean_accepted_tokens=None, acceptance_by_depth=None)
    if all(hasattr(s, "mean_accepted_tokens") for s in stats):  # SpeculativeStats: pool the counters
        steps = sum(s.row_steps for s in stats)
        row["mean_accepted_tokens"] = (sum(s.draft_tokens_accepted for s in stats) + steps) / max(steps, 1)
        depth = max(len(s.proposed_by_depth) for s in stats)
        proposed, accepted = np.zeros(depth), np.zeros(depth)
        for s in stats:
            proposed[:len(s.proposed_by_depth)] += s.proposed_by_depth
            accepted[:len(s.accepted_by_depth)] += s.accepted_by_depth
        row["acceptance_by_depth"] = [_nan_to_none(float(a / p)) if p else None
                                      for a, p in zip(accepted, proposed, strict=True)]
    return row


def _sequences(method: _Method) -> list[list[int]]:
    return [seq for o in method.outputs for seq in o.sequences()]


def benchmark(model: LlamaModel, prompts: dict[str, list[CodePrompt]], s: Settings,
              decoders: Sequence[variants.DecoderVariant], resources: dict[str, Callable[[], Any]],
              log: Callable[[str], None] = print,
              greedy_outputs: dict[tuple[str, int], list[list[int]]] | None = None,
              ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows per (task, batch, decoder), greedy first; and {decoder: reason} for skipped ones.
    `greedy_outputs`, if given, receives greedy's generated ids per (task, batch)."""
    g = s.generation
    runnable, skipped = [], {}
    for d in decoders:
        try:
            missing = [n for n in d.needs if n not in resources]
            if missing:
                raise LookupError(f"needs {missing}; the harness provides {sorted(resources)}")
            runnable.append((d, {n: resources[n]() for n in d.needs}))
        except (LookupError, FileNotFoundError, ValueError) as err:
            skipped[d.name] = str(err)
            log(f"decoder {d.name}: skipped ({err})")
    greedy = variants.get_decoder("greedy")
    rows: list[dict[str, Any]] = []
    for kind, task_prompts in prompts.items():
        for b in g.batch_sizes:
            ids = [p.ids for p in task_prompts]
            groups = [ids[i:i + b] for i in range(0, len(ids), b)]
            methods = [_Method("greedy", greedy.fn, {})] + [_Method(d.name, d.fn, opts) for d, opts in runnable]
            for _ in range(g.warmup + g.repeats):
                for m in methods:
                    if m.error:
                        continue
                    try:
                        _pass(m, model, groups, g.max_new_tokens, s.seed)
                    except Exception as err:  # noqa: BLE001  (one failing drafter must not end the benchmark)
                        if m.name == "greedy":
                            raise
                        m.error = f"{type(err).__name__}: {err}"
                        log(f"{kind} batch {b}: {m.name} failed ({m.error})")
            reference = _summary(methods[0], g.warmup)
            reference_seqs = _sequences(methods[0])
            if greedy_outputs is not None:
                greedy_outputs[(kind, b)] = reference_seqs
            by_name = {d.name: d for d, _ in runnable} | {"greedy": greedy}
            for m in methods:
                d = by_name[m.name]
                row: dict[str, Any] = dict(task=kind, batch_size=b, decoder=m.name, lossless=d.lossless,
                                           expect_identical=d.lossless and not d.sampling, prompts=len(ids),
                                           calls=len(groups), error=m.error or None)
                if not m.error:
                    row.update(_summary(m, g.warmup))
                    seqs = _sequences(m)
                    row.update(
                        identical=seqs == reference_seqs,
                        identical_fraction=float(np.mean([x == y for x, y in zip(seqs, reference_seqs, strict=True)])),
                        agreement=prefix_agreement(reference_seqs, seqs),
                        speedup=reference["e2e_seconds"] / max(row["e2e_seconds"], 1e-12),
                        decode_speedup=reference["decode_seconds"] / max(row["decode_seconds"], 1e-12),
                        wall_speedup=reference["wall_seconds"] / max(row["wall_seconds"], 1e-12),
                        tokens_per_forward=row["generated_tokens"] / max(row["target_forwards"], 1) / b,
                    )
                    accepted = row["mean_accepted_tokens"]
                    log(f"{kind} batch {b}: {m.name:>14} {1e3 * row['e2e_seconds']:9.1f} ms  "
                        f"speedup {row['speedup']:.2f}x (decode {row['decode_speedup']:.2f}x)  "
                        f"accepted {accepted if accepted is None else round(accepted, 2)}  "
                        f"identical {row['identical']}")
                rows.append(row)
    return rows, skipped


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per decoder and batch size: geometric-mean speedups and mean accepted tokens over tasks."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        if not row["error"]:
            groups.setdefault(row["decoder"], {}).setdefault(str(row["batch_size"]), []).append(row)

    def geomean(values: list[float]) -> float:
        return math.exp(statistics.fmean(math.log(v) for v in values))

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, batches in groups.items():
        for b, group in batches.items():
            accepted = [r["mean_accepted_tokens"] for r in group if r["mean_accepted_tokens"] is not None]
            out.setdefault(name, {})[b] = dict(
                speedup=geomean([r["speedup"] for r in group]),
                decode_speedup=geomean([r["decode_speedup"] for r in group]),
                mean_accepted_tokens=statistics.fmean(accepted) if accepted else None,
                all_identical=all(r["identical"] for r in group),
            )
    return out


COLUMNS = (
    ("decoder", "decoder", ""), ("task", "task", ""), ("batch_size", "batch", "d"),
    ("e2e_seconds", "e2e s", ".3f"), ("speedup", "speedup", ".2f"), ("decode_speedup", "decode x", ".2f"),
    ("wall_speedup", "wall x", ".2f"), ("mean_accepted_tokens", "accepted", ".2f"),
    ("target_forwards", "forwards", "d"), ("identical", "identical", ""),
)


def plot(rows: list[dict[str, Any]], key: str, label: str, title: str, *, skip_greedy: bool) -> Figure:
    """Bars per decoder grouped by task kind, one panel per batch size, a line at 1.0."""
    batches = sorted({r["batch_size"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = [n for n in dict.fromkeys(r["decoder"] for r in rows) if not (skip_greedy and n == "greedy")]
    fig = Figure(figsize=(max(6.0, 1.2 * len(tasks) * max(len(names), 1) + 2), 3.8 * len(batches)))
    width = 0.8 / max(len(names), 1)
    for i, b in enumerate(batches):
        ax = fig.add_subplot(len(batches), 1, i + 1)
        for j, name in enumerate(names):
            values = []
            for task in tasks:
                row = next((r for r in rows if (r["task"], r["batch_size"], r["decoder"]) == (task, b, name)), {})
                value = row.get(key)
                values.append(float("nan") if value is None else float(value))
            bars = ax.bar(np.arange(len(tasks)) + (j - (len(names) - 1) / 2) * width, values, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(np.arange(len(tasks)), tasks)
        ax.set_ylabel(label)
        ax.set_title(f"batch {b}", fontsize=9)
        if names:
            ax.legend(fontsize=7, ncols=min(len(names), 4))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class _Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[speculative {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def _prompts(s: Settings, tokenizer: Tokenizer, limit: int) -> dict[str, list[CodePrompt]]:
    t, g = s.tasks, s.generation
    documents = load_documents(s.source, s.suffixes, s.split)
    out = {}
    for kind in t.kinds:
        out[kind] = build_prompts(kind, documents, tokenizer, count=t.prompts_per_kind, prompt_tokens=t.prompt_tokens,
                                  seed=s.seed, lookahead_tokens=g.max_new_tokens,
                                  editing_max_tokens=t.editing_max_tokens, editing_min_lines=t.editing_min_lines,
                                  min_function_tokens=g.max_new_tokens)
        longest = max(len(p.ids) for p in out[kind])
        if longest + g.max_new_tokens > limit:
            raise ValueError(f"config.tasks: {kind} prompts of up to {longest} tokens + max_new_tokens "
                             f"{g.max_new_tokens} exceed the model's max_position_embeddings {limit}")
    return out


def _peer(s: Settings, prompts: dict[str, list[CodePrompt]], greedy_outputs: dict[tuple[str, int], list[list[int]]],
          log: Callable[[str], None]) -> list[dict[str, Any]] | None:
    """transformers' prompt lookup on the same prompts (None when off or torch is missing)."""
    if not s.peer.transformers:
        return None
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        log(f"transformers peer skipped ({err}; install the test extra)")
        return None
    from efficient.models import resolve_model_path
    from experiments.speculative_peer import prompt_lookup_peer

    g = s.generation
    return prompt_lookup_peer(resolve_model_path(s.model_path), s.dtype, prompts, max_new_tokens=g.max_new_tokens,
                              num_tokens=s.peer.prompt_lookup_num_tokens, repeats=g.repeats, warmup=g.warmup,
                              threads=s.peer.threads, log=log,
                              ours_greedy={kind: seqs for (kind, b), seqs in greedy_outputs.items() if b == 1})


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    s = settings_from(config)
    decoders = with_fixed_sizes(select_decoders(s.decoders),
                                {"spec_medusa": s.medusa_tree_sizes, "spec_eagle": s.eagle_tree_sizes})
    log = _Log()
    model = load_model(s.model_path, dtype=s.dtype, layer_loop=s.layer_loop)
    tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
    prompts = _prompts(s, tokenizer, model.config.max_position_embeddings)
    log(f"model {s.model_path} ({model.config.num_parameters() / 1e6:.2f}M parameters, {s.dtype}), {tokenizer!r}; "
        f"{len(prompts)} tasks x {s.tasks.prompts_per_kind} prompts; decoders {[d.name for d in decoders]}")
    cached: dict[str, Any] = {}

    def draft_model() -> LlamaModel:
        if not s.draft_path:
            raise LookupError("no draft model configured (config.draft.path is empty)")
        if "draft" not in cached:
            cached["draft"] = load_model(s.draft_path, dtype=s.draft_dtype, key="config.draft.path")
        return cached["draft"]

    def calibration_tokens() -> np.ndarray:
        if "calibration" not in cached:
            c = s.calibration
            docs = load_documents(s.source, s.suffixes, c.split, key="config.calibration")
            rows = completion_prompts(docs, tokenizer, count=c.rows, prompt_tokens=c.tokens, seed=s.seed)
            cached["calibration"] = np.asarray([p.ids for p in rows], np.int32)
        return cached["calibration"]

    def medusa_heads() -> LoadedHeads:
        if not s.medusa_path:
            raise LookupError("no Medusa heads configured (config.medusa.path is empty)")
        if "medusa" not in cached:
            cached["medusa"] = load_medusa_heads(s.medusa_path, model.config)
        return cached["medusa"]

    def feature_drafter() -> LoadedFeatureDrafter:
        if not s.eagle_path:
            raise LookupError("no feature drafter configured (config.eagle.path is empty)")
        if "eagle" not in cached:
            cached["eagle"] = load_feature_drafter(s.eagle_path, model.config)
        return cached["eagle"]

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    greedy_outputs: dict[tuple[str, int], list[list[int]]] = {}
    rows, skipped = benchmark(model, prompts, s, decoders,
                              {"draft_model": draft_model, "calibration_tokens": calibration_tokens,
                               "medusa_heads": medusa_heads, "feature_drafter": feature_drafter}, log,
                              greedy_outputs)
    peer_rows = _peer(s, prompts, greedy_outputs, log)
    metrics: dict[str, Any] = dict(
        rows=rows, summary=summarize(rows), skipped=skipped, transformers_prompt_lookup=peer_rows,
        medusa_goodput=width_choices("medusa"), eagle_goodput=width_choices("eagle"),
        decoders={d.name: dict(lossless=d.lossless, sampling=d.sampling, description=d.description,
                               paper=d.paper, needs=list(d.needs)) for d in decoders},
        model=dict(path=s.model_path, parameters=model.config.num_parameters(), dtype=s.dtype, layer_loop=s.layer_loop,
                   tokenizer=repr(tokenizer)),
        draft=dict(path=s.draft_path, dtype=s.draft_dtype, loaded="draft" in cached,
                   parameters=cached["draft"].config.num_parameters() if "draft" in cached else None),
        prompts={kind: [dict(path=p.path, line=p.line, tokens=len(p.ids), score=p.score, edit=p.edit)
                        for p in ps] for kind, ps in prompts.items()},
        machine=dict(machine_info(), python=platform.python_version(), device_count=jax.device_count(),
                     load_average_start=load_start,
                     load_average_end=os.getloadavg() if hasattr(os, "getloadavg") else None),
    )
    table = format_table(rows, COLUMNS)
    table += "\n\ngeometric mean over tasks (speedup e2e / decode, mean accepted):"
    for name, batches in metrics["summary"].items():
        for b, v in batches.items():
            accepted = "-" if v["mean_accepted_tokens"] is None else f"{v['mean_accepted_tokens']:.2f}"
            table += (f"\n  {name:>18} batch {b}: {v['speedup']:.2f}x / {v['decode_speedup']:.2f}x, "
                      f"accepted {accepted}, identical {v['all_identical']}")
    for name, reason in skipped.items():
        table += f"\nskipped decoder {name}: {reason}"
    for row in peer_rows or ():
        table += (f"\ntransformers prompt lookup ({row['num_tokens']}) on {row['task']} batch 1: {row['speedup']:.2f}x "
                  f"over transformers greedy, identical {row['identical_to_own_greedy']}")
    for row in rows:
        if row["error"]:
            table += f"\nfailed {row['decoder']} on {row['task']} batch {row['batch_size']}: {row['error']}"
        elif row["expect_identical"] and not row["identical"]:
            table += (f"\nWARNING: lossless {row['decoder']} differs from greedy on {row['task']} batch "
                      f"{row['batch_size']} (agreement {row['agreement']:.3f})")
    title = f"speculative: {s.model_path} ({model.config.num_parameters() / 1e6:.1f}M), {s.split} split"
    figures = {
        "speedup": plot(rows, "speedup", "speedup over greedy (prefill + decode)", title, skip_greedy=True),
        "mean_accepted": plot(rows, "mean_accepted_tokens", "tokens per verification", title, skip_greedy=True),
    }
    return ExperimentResult(metrics=metrics, table=table, figures=figures)
