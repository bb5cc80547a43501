"""Which layers should a self-speculative drafter skip? The calibration's search, traced.

Runs `calibrate_skip_layers` (SWIFT-style greedy search, pruned: every layer at the first
size, the best `width` after; stops after `patience` sizes without a better estimated
speedup) on held-out text and reports, per number of skipped layers, the set chosen, its
top-1 agreement with the full model, the probability overlap and the estimated speedup
(Leviathan et al. 2023, eq. 1, with the LM head's fixed cost), the choice, and the
calibration's wall time. Run through `experiments.run`; configs/layer_skip.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient.data.code_tasks import completion_prompts
from efficient.decoding.drafters.layer_skip import calibrate_skip_layers, fixed_cost_fraction
from experiments.common import (
    ExperimentResult,
    check_positive,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    tokenizer: str
    dtype: str
    source: str
    suffixes: tuple[str, ...] | None
    split: str
    rows: int
    tokens: int
    length: int
    width: int
    patience: int
    seed: int

    def __post_init__(self) -> None:
        check_positive(self, "rows", "tokens", "length", "width", "patience")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    c = config.calibration
    return Settings(model_path=str(config.model.path), tokenizer=config.model.tokenizer, dtype=config.model.dtype,
                    source=config.data.source, suffixes=tuple(config.data.suffixes) if config.data.suffixes else None,
                    split=config.data.split, rows=c.rows, tokens=c.tokens, length=c.length, width=c.width,
                    patience=c.patience, seed=int(config.seed))


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    s = settings_from(config)
    model = load_model(s.model_path, dtype=s.dtype)
    tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
    documents = load_documents(s.source, s.suffixes, s.split)
    prompts = completion_prompts(documents, tokenizer, count=s.rows, prompt_tokens=s.tokens, seed=s.seed)
    tokens = np.asarray([p.ids for p in prompts], np.int32)
    start = time.perf_counter()
    calibration = calibrate_skip_layers(model, tokens, length=s.length, width=s.width, patience=s.patience)
    seconds = time.perf_counter() - start
    rows = [dict(skipped=len(step.skip_layers), layers=" ".join(map(str, step.skip_layers)) or "-",
                 agreement=step.agreement, overlap=step.overlap, estimated_speedup=step.speedup,
                 tried=len(step.candidates), chosen=step.skip_layers == calibration.skip_layers)
            for step in calibration.trace]
    log(f"[layer_skip] chose {calibration.skip_layers} of {calibration.num_layers} layers in {seconds:.1f} s")
    metrics = dict(rows=rows, skip_layers=list(calibration.skip_layers), num_layers=calibration.num_layers,
                   calibration_seconds=seconds, fixed_cost_fraction=fixed_cost_fraction(model),
                   calibration_tokens=list(tokens.shape), length=s.length,
                   model=dict(path=s.model_path, dtype=s.dtype, parameters=model.config.num_parameters()))
    columns = (("skipped", "skipped", "d"), ("layers", "layers", ""), ("agreement", "agreement", ".3f"),
               ("overlap", "overlap", ".3f"), ("estimated_speedup", "est. speedup", ".3f"),
               ("tried", "tried", "d"), ("chosen", "chosen", ""))
    table = (format_table(rows, columns) + f"\nchose {list(calibration.skip_layers)} in {seconds:.1f} s "
             f"({tokens.shape[0]} x {tokens.shape[1]} calibration tokens, drafts of {s.length})")
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    sizes = [r["skipped"] for r in rows]
    ax.plot(sizes, [r["agreement"] for r in rows], marker="o", label="top-1 agreement")
    ax.plot(sizes, [r["estimated_speedup"] for r in rows], marker="s", label="estimated speedup")
    ax.axvline(len(calibration.skip_layers), color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("layers skipped")
    ax.legend(fontsize=8)
    ax.set_title(f"{s.model_path}: layer-skip calibration", fontsize=9)
    fig.tight_layout()
    return ExperimentResult(metrics=metrics, table=table, figures={"calibration": fig})
