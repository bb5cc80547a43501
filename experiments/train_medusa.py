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
from efficient.train.medusa import evaluate_heads, train_medusa
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
    train_data, val_data, held_out = distillation_data(config, target, tokenizer)
    d = config.data
    train_config = TrainConfig(**config.train.to_dict())
    h = config.heads
    run_ = train_medusa(target, train_data, val_data, num_heads=h.num_heads, draft_vocab=h.draft_vocab,
                        config=train_config, workdir=Path(config.workdir) / "heads", ranks=h.ranks, log=_log)
    accuracy, coverage = evaluate_heads(target, run_.heads, held_out, h.ranks)
    command = " ".join(["python -m experiments.run", *sys.argv[1:]])
    record = {**run_.record, "data": d.to_dict(), "model_path": str(config.model.path), "machine": machine_info(),
              "command": command, "accuracy_held_in_rows": run_.record["accuracy"],
              "coverage_held_in_rows": run_.coverage, "accuracy": accuracy.tolist(), "coverage": coverage}
    meta = {"target": run_.record["target"], "accuracy": accuracy.tolist(), "coverage": coverage, "record": record}
    out = save_medusa_heads(run_.heads, config.output_dir, meta)
    trees = [{"tree_size": w, "expected_accepted": expected_accepted(accuracy, medusa_tree(accuracy, w)),
              "expected_accepted_held_in_rows": expected_accepted(run_.accuracy, medusa_tree(run_.accuracy, w))}
             for w in TREE_SIZES]
    (out / "TRAINING.md").write_text(_markdown(record, accuracy, trees))
    shown = min(4, accuracy.shape[1])
    rows = [{"head": k + 1, **{f"rank{r}": float(accuracy[k, r]) for r in range(shown)},
             "top4": float(np.sum(accuracy[k, :4])), "top1_held_in": float(run_.accuracy[k, 0])}
            for k in range(accuracy.shape[0])]
    columns = [("head", "head", "d")] + [(f"rank{r}", f"rank {r}", ".3f") for r in range(shown)]
    columns += [("top4", "top-4", ".3f"), ("top1_held_in", "top-1 held-in rows", ".3f")]
    metrics = {"record": record, "accuracy": accuracy.tolist(), "coverage": coverage, "trees": trees,
               "output_dir": str(out)}
    table = format_table(rows, columns) + "\n" + "\n".join(
        f"tree {t['tree_size']}: estimated {t['expected_accepted']:.2f} tokens per verification" for t in trees)
    return ExperimentResult(metrics=metrics, table=table)


def distillation_data(config: ml_collections.ConfigDict, target: object, tokenizer: object
                      ) -> tuple[DistillationSet, DistillationSet, DistillationSet]:
    """(train, validation rows, held-out documents) of the target's self-distillation data,
    written to `config.workdir` on first use (data, teacher, heldout) and read back after."""
    d = config.data
    docs = load_documents(d.source, tuple(d.suffixes), "train", key="config.data")
    prompts = seeded_prompts(docs, tokenizer, d.prompts, d.prompt_tokens, d.prompts_per_seed)
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
    # What trees and goodput choices are built from: continuations of prompts from held-out
    # documents (the validation split), not held-in rows (whose documents training has seen).
    held_out_docs = load_documents(d.source, tuple(d.suffixes), "validation", key="config.data")
    usable = sum(len(tokenizer.encode(doc.text)) >= d.prompt_tokens for doc in held_out_docs)
    held_out = seeded_prompts(held_out_docs, tokenizer, d.heldout_prompts, d.prompt_tokens,
                              min(d.prompts_per_seed, usable))
    write_self_distillation(target, held_out, workdir / "heldout", new_tokens=d.new_tokens,
                            batch_size=min(d.batch_size, len(held_out)), log=_log)
    return train_data, val_data, load_self_distillation(workdir / "heldout", target.config)


def seeded_prompts(docs: list, tokenizer: object, count: int, length: int, per_seed: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: up to `per_seed` documents per seed (1, 2, ...), each
    at a line the seed picks (`code_prompts`)."""
    if per_seed < 1:
        raise ValueError(f"config.data: no document holds {length} tokens")
    prompts: list[list[int]] = []
    seed = 1
    while len(prompts) < count:
        prompts += code_prompts(docs, tokenizer, min(per_seed, count - len(prompts)), length, seed=seed)
        seed += 1
    return prompts


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
        "Accuracy on held-out documents (the validation split's continuations; the head's rank-r candidate is "
        "the target's token), which the tree and the goodput choice use:",
        "",
        "| head | " + " | ".join(f"rank {r}" for r in range(accuracy.shape[1])) + " |",
        "|---" * (accuracy.shape[1] + 1) + "|",
    ]
    for k in range(accuracy.shape[0]):
        lines.append(f"| {k + 1} | " + " | ".join(f"{a:.3f}" for a in accuracy[k]) + " |")
    held_in = record["accuracy_held_in_rows"]
    lines += ["", "Top-1 on the held-in documents' held-out rows (the continuations of other lines of documents "
              "training saw): " + ", ".join(f"head {k + 1} {row[0]:.3f}" for k, row in enumerate(held_in)),
              "", "Estimated tokens per verification (Medusa's independence estimate; from held-in rows in brackets):",
              ""]
    lines += [f"- tree of {t['tree_size']} nodes: {t['expected_accepted']:.2f} ({t['expected_accepted_held_in_rows']:.2f})"
              for t in trees]
    return "\n".join(lines) + "\n"
