"""Train Medusa-1 heads on the target's own continuations and export them (configs/train_medusa.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections
import numpy as np

from efficient.decoding.drafters.medusa import expected_accepted, medusa_tree, save_medusa_heads
from efficient.train.config import TrainConfig
from efficient.train.distill import (
    DistillationSet,
    load_self_distillation,
    write_self_distillation,
    write_teacher_forced,
)
from efficient.train.export import machine_info
from efficient.train.medusa import train_medusa
from experiments.common import (
    ExperimentResult,
    code_prompts,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
)

TREE_SIZES = (4, 8, 16, 32)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    target = load_model(config.model.path, dtype=config.model.dtype or None)
    tokenizer = load_tokenizer_for(config.model.path, config.model.tokenizer, target.config.vocab_size)
    d = config.data
    docs = load_documents(d.source, tuple(d.suffixes), "train", key="config.data")
    prompts: list[list[int]] = []
    seed = 1
    while len(prompts) < d.prompts:  # up to prompts_per_seed documents per seed, at a seeded line each
        count = min(d.prompts_per_seed, d.prompts - len(prompts))
        prompts += code_prompts(docs, tokenizer, count, d.prompt_tokens, seed=seed)
        seed += 1
    workdir = Path(config.workdir)
    write_self_distillation(target, prompts, workdir / "data", new_tokens=d.new_tokens, batch_size=d.batch_size,
                            log=_log)
    data = load_self_distillation(workdir / "data", target.config)
    train_data, val_data = data.split(d.validation_rows)  # held out: the target's own continuations
    if d.teacher_windows:
        windows = text_windows(docs, tokenizer, d.teacher_windows, d.new_tokens, seed=config.seed)
        write_teacher_forced(target, windows, workdir / "teacher", batch_size=d.batch_size, log=_log)
        teacher = load_self_distillation(workdir / "teacher", target.config)
        train_data = DistillationSet.concatenate([train_data, teacher])
    train_config = TrainConfig(**config.train.to_dict())
    h = config.heads
    run_ = train_medusa(target, train_data, val_data, num_heads=h.num_heads, draft_vocab=h.draft_vocab,
                        config=train_config, workdir=workdir / "heads", ranks=h.ranks, log=_log)
    command = " ".join(["python -m experiments.run", *sys.argv[1:]])
    record = {**run_.record, "data": d.to_dict(), "model_path": str(config.model.path), "machine": machine_info(),
              "command": command}
    meta = {"target": run_.record["target"], "accuracy": run_.accuracy.tolist(), "coverage": run_.coverage,
            "record": record}
    out = save_medusa_heads(run_.heads, config.output_dir, meta)
    trees = [{"tree_size": w, "expected_accepted": expected_accepted(run_.accuracy, medusa_tree(run_.accuracy, w))}
             for w in TREE_SIZES]
    (out / "TRAINING.md").write_text(_markdown(record, run_.accuracy, trees))
    rows = [{"head": k + 1, **{f"rank{r}": float(run_.accuracy[k, r]) for r in range(min(4, run_.accuracy.shape[1]))},
             "top4": float(np.sum(run_.accuracy[k, :4]))} for k in range(run_.accuracy.shape[0])]
    columns = [("head", "head", "d")] + [(f"rank{r}", f"rank {r}", ".3f") for r in range(min(4, run_.accuracy.shape[1]))]
    columns.append(("top4", "top-4", ".3f"))
    metrics = {"record": record, "accuracy": run_.accuracy.tolist(), "coverage": run_.coverage, "trees": trees,
               "output_dir": str(out)}
    table = format_table(rows, columns) + "\n" + "\n".join(
        f"tree {t['tree_size']}: estimated {t['expected_accepted']:.2f} tokens per verification" for t in trees)
    return ExperimentResult(metrics=metrics, table=table)


def text_windows(docs: list, tokenizer: object, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` non-overlapping windows of `length` tokens, cut from documents in a seeded order."""
    rng = np.random.default_rng(seed)
    windows: list[list[int]] = []
    for i in rng.permutation(len(docs)):
        ids = tokenizer.encode(docs[i].text)
        windows += [ids[j:j + length] for j in range(0, len(ids) - length + 1, length)]
        if len(windows) >= count:
            return windows[:count]
    raise ValueError(f"config.data.teacher_windows: the documents hold only {len(windows)} windows of "
                     f"{length} tokens, {count} asked for")


def _markdown(record: dict, accuracy: np.ndarray, trees: list[dict]) -> str:
    lines = [
        "# Medusa-1 heads for SmolLM2-135M-Instruct" if "smollm2" in record["model_path"] else "# Medusa-1 heads",
        "",
        f"- command: `{record['command'] or 'python -m experiments.run --config configs/train_medusa.py'}`",
        f"- data: {record['train_positions']} training and {record['validation_positions']} held-out positions: "
        f"the target's greedy continuations ({record['data']['new_tokens']} tokens) of "
        f"{record['data']['prompt_tokens']}-token held-in stdlib prompts, and "
        f"{record['data']['teacher_windows']} teacher-forced windows of held-in stdlib text, labelled only where "
        "the text follows the target's greedy path (held out: continuations only)",
        f"- {record['num_heads']} heads over a {record['draft_vocab']}-token draft vocabulary "
        f"(held-out coverage {record['coverage']:.3f}); {record['steps']} steps of "
        f"{record['train_config']['batch_size']} x {record['train_config']['seq_len']} positions, "
        f"{record['wall_time_s']:.0f} s on {record['machine']['processor']} "
        f"({record['machine']['cpus_usable']} CPUs usable), final train loss {record['final_train_loss']:.3f}",
        "",
        "Held-out accuracy (the head's rank-r candidate is the target's token):",
        "",
        "| head | " + " | ".join(f"rank {r}" for r in range(accuracy.shape[1])) + " |",
        "|---" * (accuracy.shape[1] + 1) + "|",
    ]
    for k in range(accuracy.shape[0]):
        lines.append(f"| {k + 1} | " + " | ".join(f"{a:.3f}" for a in accuracy[k]) + " |")
    lines += ["", "Estimated tokens per verification (Medusa's independence estimate):", ""]
    lines += [f"- tree of {t['tree_size']} nodes: {t['expected_accepted']:.2f}" for t in trees]
    return "\n".join(lines) + "\n"
