"""Run any experiment from its config file.

    python -m experiments.run --config configs/quickstart.py
    python -m experiments.run --config configs/quickstart.py:tiny --config.model.path=<HF folder>

`config.experiment` names a module of experiments/ whose `run(config)` returns
an `experiments.common.ExperimentResult` (a new experiment is one such module
plus its configs/<name>.py). The run is written to
<config.results_dir>/<config.experiment>/<config.run_name or a timestamp>/:
config.json (the resolved config), metrics.json, and one PNG per figure; the
table is printed. Configs are locked: an unknown `--config.key` is an error (one
line naming the key and the valid keys).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import app
from ml_collections import config_flags

from experiments.common import ExperimentResult, parse_config_flags

EXPERIMENTS_DIR = Path(__file__).resolve().parent


def experiment_fn(name: str) -> Callable[[ml_collections.ConfigDict], ExperimentResult]:
    """The `run` function of experiments/<name>.py; ValueError listing those that exist
    (modules of experiments/ that define `run` and return an `ExperimentResult`)."""
    available = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py")
                       if p.stem not in ("__init__", "run", "common") and
                       "def run(" in (text := p.read_text(encoding="utf-8")) and "ExperimentResult" in text)
    if not isinstance(name, str) or name not in available:
        raise ValueError(f"config.experiment: unknown experiment {name!r}; available: {available}")
    module = importlib.import_module(f"experiments.{name}")
    return module.run


def run_dir(results_dir: str | Path, experiment: str, run_name: str = "") -> Path:
    """results_dir/experiment/(run_name or a timestamp); a taken timestamp gets a suffix."""
    base = Path(results_dir) / experiment
    if run_name:
        return base / run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = base / stamp, 1
    while path.exists():
        path, n = base / f"{stamp}-{n}", n + 1
    return path


def run_experiment(config: ml_collections.ConfigDict, *, command: str = "") -> Path:
    """Run `config.experiment` and write its results; returns the run folder."""
    for key in ("experiment", "results_dir"):
        if key not in config:
            raise KeyError(f"config.{key}: every experiment config needs it (see configs/quickstart.py)")
    fn = experiment_fn(config.experiment)
    out = run_dir(config.results_dir, config.experiment, config.get("run_name", ""))
    start = time.perf_counter()
    result = fn(config)
    if not isinstance(result, ExperimentResult):
        raise TypeError(f"experiments.{config.experiment}.run returned {type(result).__name__}, "
                        "expected an ExperimentResult")
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_best_effort(indent=2))
    metrics = dict(result.metrics, experiment=config.experiment, wall_seconds=seconds, command=command)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    for name, figure in result.figures.items():
        figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    print(result.table)
    print(f"{config.experiment}: {seconds:.1f} s; wrote {out}", flush=True)
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.<key>=<value>")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/quickstart.py")
    run_experiment(_CONFIG.value, command=" ".join(["python -m experiments.run", *sys.argv[1:]]))


if __name__ == "__main__":
    # Flags are defined only when run as a script, so importing this module defines none
    # (experiments.run and experiments.train import in one process).
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: configs/<name>.py[:variant].",
                                              lock_config=True)
    app.run(main, flags_parser=parse_config_flags)
