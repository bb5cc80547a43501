"""Train an EAGLE-style feature drafter on the target's own continuations and export it
(configs/train_eagle.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections

from efficient.decoding.drafters.eagle_model import save_feature_drafter
from efficient.train.config import TrainConfig
from efficient.train.eagle import evaluate_feature_drafter, train_feature_drafter
from efficient.train.export import machine_info
from experiments.common import (
    ExperimentResult,
    format_table,
    load_model,
    load_tokenizer_for,
)
from experiments.train_medusa import _log, distillation_data


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    target = load_model(config.model.path, dtype=config.model.dtype or None)
    tokenizer = load_tokenizer_for(config.model.path, config.model.tokenizer, target.config.vocab_size)
    train_data, val_data, held_out = distillation_data(config, target, tokenizer)
    dr = config.drafter
    run_ = train_feature_drafter(target, train_data, val_data, draft_vocab=dr.draft_vocab,
                                 config=TrainConfig(**config.train.to_dict()), workdir=Path(config.workdir) / "eagle",
                                 noise=dr.noise, log=_log)
    top1 = evaluate_feature_drafter(target, run_.model, run_.vocab, held_out)
    command = " ".join(["python -m experiments.run", *sys.argv[1:]])
    record = {**run_.record, "data": config.data.to_dict(), "model_path": str(config.model.path),
              "machine": machine_info(), "command": command, "top1_held_in_rows": run_.top1, "top1": top1}
    out = save_feature_drafter(run_.model, run_.vocab, config.output_dir,
                               {"target": run_.record["target"], "top1": top1, "record": record})
    (out / "TRAINING.md").write_text(_markdown(record))
    rows = [{"split": "held-out documents", "top1": top1}, {"split": "held-in rows", "top1": run_.top1}]
    table = format_table(rows, [("split", "split", "s"), ("top1", "one-step top-1", ".3f")])
    return ExperimentResult(metrics={"record": record, "top1": top1, "output_dir": str(out)}, table=table)


def _markdown(record: dict) -> str:
    title = "SmolLM2-135M-Instruct" if "smollm2" in record["model_path"] else "the target"
    c = record["train_config"]
    return "\n".join([
        f"# EAGLE-style feature drafter for {title}",
        "",
        f"- command: `{record['command'] or 'python -m experiments.run --config configs/train_eagle.py'}`",
        f"- data: {record['train_positions']} training and {record['validation_positions']} validation positions "
        "(the self-distillation data of configs/train_medusa.py: the target's greedy continuations of held-in "
        "stdlib prompts and teacher-forced held-in text, trained on only where the text follows the greedy path)",
        f"- one draft layer (started from the target's last), {record['draft_vocab']}-token draft vocabulary, "
        f"input noise U(-{record['noise']}, {record['noise']}); {record['steps']} steps of {c['batch_size']} x "
        f"{c['seq_len']} positions, {record['wall_time_s']:.0f} s on {record['machine']['processor']} "
        f"({record['machine']['cpus_usable']} CPUs usable), final train loss {record['final_train_loss']:.3f}",
        f"- one-step top-1 (the draft's argmax over the draft vocabulary is the target's, teacher-forced features): "
        f"held-out documents {record['top1']:.3f}, held-in rows {record['top1_held_in_rows']:.3f}",
        "",
    ])
