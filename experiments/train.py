"""Train (or resume) a byte-level Llama-style model and export it as an HF folder.

    python -m experiments.train --config configs/train_target.py
    python -m experiments.train --config configs/train_draft.py --config.train.steps=500 \
        [--workdir=workdirs/draft] [--output_dir=checkpoints/draft]

Resumes from the latest orbax checkpoint in the workdir if there is one.
`--config.model.*` defines the architecture, `--config.train.*` the run.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from efficient.data import ByteTokenizer, Corpus, Document, Tokenizer, load_tokenizer
from efficient.models import ModelConfig, RopeConfig
from efficient.parallel import NAMED_RULES, AxisRules, ModelSharding, make_mesh
from efficient.train import TrainConfig, TrainResult, train
from experiments.common import parse_config_flags



def model_config_from(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ModelConfig:
    """The typed architecture; special token ids come from the tokenizer."""
    fields = cfg.to_dict()
    theta = float(fields.pop("rope_theta", 10000.0))
    return ModelConfig(
        **fields,
        rope=RopeConfig(theta=theta),
        bos_token_id=tokenizer.bos_id,
        eos_token_ids=(tokenizer.eos_id,),
        pad_token_id=tokenizer.pad_id,
    )


def tokenizer_from(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "byte" else load_tokenizer(name)


def documents_from(cfg: ml_collections.ConfigDict) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents of the configured corpus."""
    if cfg.source == "stdlib":
        corpus = Corpus.from_stdlib()
    else:
        suffixes = tuple(cfg.suffixes) if cfg.suffixes else None
        corpus = Corpus.from_folder(cfg.source, suffixes=suffixes)
    train_docs, val_docs = corpus.split("train"), corpus.split("validation")
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        if not docs:
            raise ValueError(f"config.data.source: corpus {corpus!r} has an empty {split} split")
    return train_docs, val_docs


def run(config: ml_collections.ConfigDict, *, workdir: str | None = None, output_dir: str | None = None,
        stop_at_step: int | None = None, command: str = "", init_from: str | None = None) -> TrainResult:
    """Builds the typed objects from `config` and trains; the script's whole job."""
    tokenizer = tokenizer_from(config.data.tokenizer)
    model_config = model_config_from(config.model, tokenizer)
    train_config = TrainConfig(**config.train.to_dict())
    train_docs, val_docs = documents_from(config.data)
    workdir = workdir or config.workdir
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return train(
        model_config, train_config, train_docs, val_docs, tokenizer,
        workdir=workdir,
        output_dir=output_dir or config.output_dir,
        stop_at_step=stop_at_step,
        name=config.name,
        command=command,
        init_from=init_from,
        sharding=sharding_from(config.get("mesh")),
        extra_record={"data": config.data.to_dict()},
    )


def sharding_from(mesh: ml_collections.ConfigDict | None) -> ModelSharding | None:
    """The run's `ModelSharding` (None for one device); errors name `config.mesh`."""
    if mesh is None or mesh.data * mesh.model == 1:
        return None
    if mesh.rules not in NAMED_RULES:
        raise ValueError(f"config.mesh.rules must be one of {sorted(NAMED_RULES)}, got {mesh.rules!r}")
    devices = jax.devices()
    if mesh.data * mesh.model > len(devices):
        raise ValueError(f"config.mesh: data={mesh.data} x model={mesh.model} needs {mesh.data * mesh.model} devices, "
                         f"this machine has {len(devices)}")
    grid = make_mesh(data=mesh.data, model=mesh.model, devices=devices[: mesh.data * mesh.model])
    return ModelSharding(grid, AxisRules.of(NAMED_RULES[mesh.rules]))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    command = "python -m experiments.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run(_CONFIG.value, workdir=_WORKDIR.value, output_dir=_OUTPUT.value,
                 stop_at_step=_STOP.value, command=command, init_from=_INIT.value)
    summary = {k: result.record[k] for k in ("step", "tokens_seen", "final_train_loss", "validation",
                                              "wall_time_s")}
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    # Flags are defined only when run as a script, so importing this module defines none
    # (experiments.run and experiments.train import in one process).
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Orbax checkpoint folder (default: config.workdir).")
    _OUTPUT = flags.DEFINE_string("output_dir", None, "Exported HF folder (default: config.output_dir).")
    _INIT = flags.DEFINE_string("init_from", None, "HF folder whose weights start a fresh run (warm restart).")
    _STOP = flags.DEFINE_integer("stop_at_step", None, "Stop (and checkpoint) at this step; resume later.")
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_config_flags)
