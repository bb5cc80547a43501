"""Paged and KIVI-quantized caches on SmolLM2-135M-Instruct: bits/byte, passkey retrieval,
memory and decode speed, with transformers' QuantizedCache beside them when optimum-quanto
is installed (`pip install -e ".[peer]"`).

    python -m experiments.run --config configs/kv_quant.py
Smoke size (seconds, for tests):
    python -m experiments.run --config configs/kv_quant.py:tiny --config.model.path=<folder>
"""

from __future__ import annotations

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in ("default", "tiny"):
        raise ValueError(f"config variant must be 'default' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.experiment = "kv_quant"
    c.results_dir = "results"
    c.run_name = ""  # empty: a timestamp
    c.seed = 0
    # layer_loop: "scan" (stacked layers and caches), "unrolled" or "auto" (unrolled on CPU, with per-layer
    # cache buffers: no per-layer slice copies; efficient.models.set_layer_loop).
    c.model = ml_collections.ConfigDict(dict(path="smollm2", tokenizer="auto", dtype="float32", layer_loop="scan"))
    # chunk <= residual_length: each chunk attends to its own tokens in full precision (as the peer does).
    c.perplexity = ml_collections.ConfigDict(dict(seq_len=64 if tiny else 1024, max_windows=2 if tiny else 4,
                                                  batch_size=2 if tiny else 4, chunk=16 if tiny else 32))
    # bits: any of 8, 4, 2 (the default run measures 4 and 2 to fit the CPU's time).
    c.kivi = ml_collections.ConfigDict(dict(bits=(2,) if tiny else (4, 2), group_size=8 if tiny else 32,
                                            residual_length=16 if tiny else 32,
                                            # also stored in bfloat16 (scales, zeros, residual) at these widths
                                            bf16_bits=() if tiny else (4, 2),
                                            # also with the first `sinks` tokens kept exact (attention sinks),
                                            # float32 and (where in bf16_bits) bfloat16: kivi{b}_sinks, kivi{b}_bf16_sinks
                                            sinks_bits=() if tiny else (2,), sinks=4))
    # GEAR (Kang et al. 2024) on KIVI: rank of each group's error approximation, fraction of exact outliers.
    # sinks_bits: also with the first kivi.sinks tokens exact (gear{b}_sinks).
    c.gear = ml_collections.ConfigDict(dict(bits=(2,), rank=2, outlier_fraction=0.02, sinks_bits=()))
    # VidKV (Tao et al. 2025): half of each group's key channels at 2 bits, the rest as 1-bit real-DFT
    # coefficients; ternary values; the residual is KIVI's. Variants: vidkv, vidkv_nofft (no DFT), vidkv_bf16,
    # vidkv_sinks and vidkv_bf16_sinks (the first `sinks` tokens kept exact).
    c.vidkv = ml_collections.ConfigDict(dict(variants=("vidkv",) if tiny else ("vidkv", "vidkv_nofft", "vidkv_bf16",
                                                                               "vidkv_sinks", "vidkv_bf16_sinks"),
                                             group_size=8 if tiny else 32, anomalous_fraction=0.5, sinks=4))
    # ZipCache (He et al. 2024): channel-separable tokenwise codes, each group's `salient_fraction` of tokens
    # with the highest normalised attention score at hi_bits, the rest at lo_bits; the residual is KIVI's (a
    # token is scored while it waits there). Variants: zipcache, zipcache_bf16, zipcache_unscored (the same
    # memory, each group's first tokens at hi_bits: what the saliency is worth).
    c.zipcache = ml_collections.ConfigDict(dict(
        variants=("zipcache",) if tiny else ("zipcache", "zipcache_bf16", "zipcache_unscored"),
        group_size=8 if tiny else 32, salient_fraction=0.5, hi_bits=4, lo_bits=2))
    # A comma-separated subset of the caches to measure (dense and dense_bf16 always run: the baselines).
    c.caches = ""
    c.paged = ml_collections.ConfigDict(dict(page_size=16))
    c.memory_capacity = 64 if tiny else 4096
    # Passkey contexts the dense model solves at >= 90% (SmolLM2 on 3 depths: 1.00 at 2048, 0.67 at 4096);
    # the tiny smoke run skips retrieval (its random model retrieves nothing; it cost a third of the test).
    c.retrieval = ml_collections.ConfigDict(dict(contexts=() if tiny else (2048,),
                                                 depths=(0.5,) if tiny else (0.1, 0.5, 0.9), samples=1))
    c.speed = ml_collections.ConfigDict(dict(prompt_tokens=16 if tiny else 512, new_tokens=4 if tiny else 32))
    c.peer = ml_collections.ConfigDict(dict(bits=() if tiny else (2, 4)))
    return c
