"""Speculative decoding benchmark (Spec-Bench style) on held-out stdlib code.

    python -m experiments.run --config configs/speculative.py
    python -m experiments.run --config configs/speculative.py --config.decoders=spec_draft,spec_adaptive
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/speculative.py:tiny --config.model.path=<folder> \
        --config.draft.path=<folder>

For each task kind (completion, repetitive code, function editing) and batch
size, runs plain greedy decoding and every selected speculative decoder on the
same prompts and reports speedup over greedy (end to end and decode only),
mean accepted tokens per verification, target forwards, acceptance by depth,
and whether the output is identical to greedy. Writes results/speculative/<timestamp>/.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "speculative"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    # path: a packaged model name ("smollm2": SmolLM2-135M-Instruct), a .gguf file or an HF folder.
    # tokenizer: "auto" (the GGUF file's, the folder's tokenizer.json, else bytes), "byte", or a path.
    # layer_loop: "scan" (stacked layers), "unrolled" or "auto" (unrolled on CPU: no per-layer weight
    # and cache slice copies, twice the compile time; efficient.models.set_layer_loop).
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32", layer_loop="scan"))
    # Loaded only when a selected decoder needs "draft_model"; "": none (those decoders are skipped).
    # The byte-level pair: --config.model.path=checkpoints/target --config.draft.path=checkpoints/draft
    c.draft = ml_collections.ConfigDict(dict(path="", dtype="float32"))
    # Medusa heads for the target (configs/train_medusa.py exports them); loaded only when
    # spec_medusa runs; heads trained for another model are refused (the decoder is skipped).
    # tree_sizes: also run spec_medusa at these fixed tree sizes (spec_medusa_w<size>), beside the
    # size its goodput estimate picks.
    c.medusa = ml_collections.ConfigDict(dict(path="checkpoints/medusa-smollm2", tree_sizes=()))
    # The EAGLE-style feature drafter (configs/train_eagle.py exports it), for spec_eagle, likewise.
    c.eagle = ml_collections.ConfigDict(dict(path="checkpoints/eagle-smollm2", tree_sizes=()))
    # source: "stdlib" or a folder of text files; split: the prompts' split (train / validation / test / all).
    c.data = ml_collections.ConfigDict(dict(source="stdlib", suffixes=(".py",), split="test"))
    # kinds: any of completion, repetitive, editing (efficient/data/code_tasks.py).
    # prompt_tokens: exact length of completion / repetitive prompts; editing prompts (function +
    # edit comment + first edited line) have at most editing_max_tokens, from functions of at least
    # editing_min_lines lines and max_new_tokens tokens.
    # tiny: all prompts pad to the 128 bucket and (seed 0) are 100-104 tokens long, so each known
    # drafter gets the same cache capacity on every task, and one batch size: one compilation per
    # decoder (a few seconds each on a slow CPU).
    c.tasks = ml_collections.ConfigDict(dict(
        kinds=("completion", "repetitive", "editing"), prompts_per_kind=4,
        prompt_tokens=100 if tiny else 256, editing_max_tokens=104 if tiny else 512,
        editing_min_lines=2 if tiny else 4,
    ))
    # batch_sizes must divide prompts_per_kind (batch 1: each prompt alone, times summed).
    # Times: median of `repeats` runs after `warmup` runs (compilation); methods are interleaved per repeat.
    c.generation = ml_collections.ConfigDict(dict(
        max_new_tokens=12 if tiny else 128, batch_sizes=(2,) if tiny else (1, 4),
        repeats=1 if tiny else 3, warmup=1,
    ))
    # "calibration_tokens" for self-speculative decoders: rows x tokens of held-out text from `split`.
    c.calibration = ml_collections.ConfigDict(dict(split="validation", rows=2, tokens=32 if tiny else 256))
    # Registered decoder names, comma-separated, or "all": every registered decoder except the
    # baselines greedy and sample (greedy is always run as the reference).
    c.decoders = "all"
    # The peer: transformers' generate(prompt_lookup_num_tokens=...) against its own greedy on the
    # same prompts at batch 1, same weights (needs torch and transformers: the test extra).
    c.peer = ml_collections.ConfigDict(dict(transformers=not tiny, prompt_lookup_num_tokens=10, threads=2))
    return c
