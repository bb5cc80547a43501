"""Paged and quantized KV caches on the real model: quality against memory and speed.

For each cache (dense, dense bf16, paged, KIVI at each configured bit width, GEAR on
KIVI: a low-rank approximation of the quantization error and exact outliers, VidKV's
1.5-bit keys and ternary values, ZipCache's mixed 4/2-bit codes by saliency) on the
embedded default (SmolLM2-135M-Instruct): bits/byte of held-out stdlib windows
prefilled through the cache in chunks (a lossy cache changes the logits of every
chunk after the first), passkey retrieval at the configured context lengths,
greedy decode tokens/s, and `nbytes()` of a one-row cache at `memory_capacity`
slots (packed codes, scales, zeros and the residual included), as a ratio to the
dense bfloat16 cache. Side by side in the same run, when optimum-quanto is
installed: transformers' `QuantizedCache` (quanto backend, transformers' default
settings) on the same model, windows and chunking (experiments/kv_quant_peer.py).
Run through `experiments.run`; configs/kv_quant.py.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import ml_collections
from matplotlib.figure import Figure

from efficient import variants
from efficient.cache import DenseKVCache, KIVICache, PagedKVCache, VidKVCache, ZipCache
from efficient.data import eval_windows, needle_grid
from efficient.eval import measure_generation, perplexity, retrieval_accuracy, select_windows
from efficient.models import resolve_model_path
from experiments.common import (
    ExperimentResult,
    check_positive,
    code_prompts,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
    machine_info,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    seq_len: int
    max_windows: int
    batch_size: int
    chunk: int
    bits: tuple[int, ...]
    group_size: int
    residual_length: int
    page_size: int
    memory_capacity: int
    contexts: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    prompt_tokens: int
    new_tokens: int
    peer_bits: tuple[int, ...]
    seed: int
    gear_bits: tuple[int, ...] = ()
    bf16_bits: tuple[int, ...] = ()
    gear_rank: int = 2
    gear_outlier_fraction: float = 0.02
    vidkv_variants: tuple[str, ...] = ()
    vidkv_group_size: int = 32
    vidkv_anomalous_fraction: float = 0.5
    vidkv_sinks: int = 4
    kivi_sinks_bits: tuple[int, ...] = ()
    kivi_sinks: int = 4
    gear_sinks_bits: tuple[int, ...] = ()
    zipcache_variants: tuple[str, ...] = ()
    zipcache_group_size: int = 32
    zipcache_salient_fraction: float = 0.5
    zipcache_hi_bits: int = 4
    zipcache_lo_bits: int = 2
    caches: tuple[str, ...] = ()  # empty: all

    def __post_init__(self) -> None:
        check_positive(self, "seq_len", "max_windows", "batch_size", "chunk", "group_size", "residual_length",
                       "page_size", "memory_capacity", "samples", "prompt_tokens", "new_tokens")
        if self.chunk > self.residual_length:
            raise ValueError(f"config.perplexity.chunk={self.chunk} exceeds config.kivi.residual_length="
                             f"{self.residual_length}: a chunk's own tokens would be attended quantized")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    return Settings(
        model_path=str(config.model.path), seq_len=config.perplexity.seq_len,
        max_windows=config.perplexity.max_windows, batch_size=config.perplexity.batch_size,
        chunk=config.perplexity.chunk, bits=tuple(config.kivi.bits), group_size=config.kivi.group_size,
        residual_length=config.kivi.residual_length, page_size=config.paged.page_size,
        memory_capacity=config.memory_capacity, contexts=tuple(config.retrieval.contexts),
        depths=tuple(config.retrieval.depths), samples=config.retrieval.samples,
        prompt_tokens=config.speed.prompt_tokens, new_tokens=config.speed.new_tokens,
        peer_bits=tuple(config.peer.bits), seed=int(config.seed), gear_bits=tuple(config.gear.bits),
        gear_rank=config.gear.rank, gear_outlier_fraction=config.gear.outlier_fraction,
        bf16_bits=tuple(config.kivi.bf16_bits), vidkv_variants=tuple(config.vidkv.variants),
        vidkv_group_size=config.vidkv.group_size, vidkv_anomalous_fraction=config.vidkv.anomalous_fraction,
        vidkv_sinks=config.vidkv.sinks, kivi_sinks_bits=tuple(config.kivi.sinks_bits), kivi_sinks=config.kivi.sinks,
        gear_sinks_bits=tuple(config.gear.sinks_bits), zipcache_variants=tuple(config.zipcache.variants),
        zipcache_group_size=config.zipcache.group_size, zipcache_salient_fraction=config.zipcache.salient_fraction,
        zipcache_hi_bits=config.zipcache.hi_bits, zipcache_lo_bits=config.zipcache.lo_bits,
        caches=tuple(name.strip() for name in str(config.caches).split(",") if name.strip()))


def cache_factories(s: Settings) -> dict[str, tuple[Callable[..., Any], bool]]:
    """name -> (factory, lossless)."""
    out: dict[str, tuple[Callable[..., Any], bool]] = {
        "dense": (DenseKVCache.for_model, True),
        "dense_bf16": (functools.partial(DenseKVCache.for_model, dtype="bfloat16"), False),
        "paged": (functools.partial(PagedKVCache.for_model, page_size=s.page_size), True),
    }
    def kivi(**settings: Any) -> tuple[Callable[..., Any], bool]:
        return functools.partial(KIVICache.for_model, group_size=s.group_size, residual_length=s.residual_length,
                                 **settings), False

    gear = dict(rank=s.gear_rank, outlier_fraction=s.gear_outlier_fraction)
    for bits in s.bits:
        out[f"kivi{bits}"] = kivi(bits=bits)
    for bits in s.bf16_bits:  # scales, zeros and the residual in bfloat16, as a bf16 model would keep them
        out[f"kivi{bits}_bf16"] = kivi(bits=bits, dtype="bfloat16")
    for bits in s.kivi_sinks_bits:  # the first tokens exact (attention sinks)
        out[f"kivi{bits}_sinks"] = kivi(bits=bits, sinks=s.kivi_sinks)
        if bits in s.bf16_bits:
            out[f"kivi{bits}_bf16_sinks"] = kivi(bits=bits, dtype="bfloat16", sinks=s.kivi_sinks)
    for bits in s.gear_bits:
        out[f"gear{bits}"] = kivi(bits=bits, **gear)
    for bits in s.gear_sinks_bits:
        out[f"gear{bits}_sinks"] = kivi(bits=bits, sinks=s.kivi_sinks, **gear)
    vidkv = dict(vidkv={}, vidkv_nofft=dict(fft=False), vidkv_bf16=dict(dtype="bfloat16"),
                 vidkv_sinks=dict(sinks=s.vidkv_sinks), vidkv_bf16_sinks=dict(dtype="bfloat16", sinks=s.vidkv_sinks))
    for name in s.vidkv_variants:
        if name not in vidkv:
            raise ValueError(f"config.vidkv.variants: unknown {name!r}; choose from {sorted(vidkv)}")
        out[name] = (functools.partial(VidKVCache.for_model, group_size=s.vidkv_group_size,
                                       residual_length=s.residual_length,
                                       anomalous_fraction=s.vidkv_anomalous_fraction, **vidkv[name]), False)
    zipcache = dict(zipcache={}, zipcache_bf16=dict(dtype="bfloat16"), zipcache_unscored=dict(scored=False))
    for name in s.zipcache_variants:
        if name not in zipcache:
            raise ValueError(f"config.zipcache.variants: unknown {name!r}; choose from {sorted(zipcache)}")
        out[name] = (functools.partial(ZipCache.for_model, group_size=s.zipcache_group_size,
                                       residual_length=s.residual_length, salient_fraction=s.zipcache_salient_fraction,
                                       hi_bits=s.zipcache_hi_bits, lo_bits=s.zipcache_lo_bits, **zipcache[name]), False)
    unknown = sorted(set(s.caches) - set(out))
    if unknown:
        raise ValueError(f"config.caches: unknown {unknown}; configured: {sorted(out)}")
    if s.caches:
        out = {name: entry for name, entry in out.items() if name in {"dense", "dense_bf16", *s.caches}}
    return out


def peer_rows(s: Settings, windows: Any, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], str | None]:
    """transformers' DynamicCache and QuantizedCache rows, or the reason they were skipped."""
    if not s.peer_bits:
        return [], "config.peer.bits is empty"
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("optimum") is None or \
            importlib.util.find_spec("optimum.quanto") is None:
        return [], "transformers' QuantizedCache needs torch and optimum-quanto (pip install -e '.[peer]')"
    from experiments.kv_quant_peer import transformers_cache_bits_per_byte

    rows = []
    for nbits in (None, *s.peer_bits):
        row = transformers_cache_bits_per_byte(s.model_path, windows, chunk=s.chunk, nbits=nbits)
        name = "transformers_dynamic" if nbits is None else f"transformers_quanto{nbits}"
        rows.append(dict(cache=name, bits_per_byte=row["bits_per_byte"], seconds=row["seconds"],
                         settings=row["settings"]))
        log(f"[kv_quant] {name}: bits/byte {row['bits_per_byte']:.4f}")
    return rows, None


def plot(rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for row in rows:
        if row.get("memory_ratio_vs_bf16") is None:
            continue
        ax.scatter(row["memory_mib"], row["bits_per_byte"])
        ax.annotate(row["cache"], (row["memory_mib"], row["bits_per_byte"]), fontsize=8)
    ax.set_xlabel("cache MiB (one row)")
    ax.set_ylabel("bits/byte (held-out stdlib)")
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    s = settings_from(config)
    model = load_model(s.model_path, dtype=config.model.dtype, layer_loop=config.model.layer_loop)
    tokenizer = load_tokenizer_for(s.model_path, config.model.tokenizer, model.config.vocab_size)
    documents = load_documents("stdlib", (".py",), "test")
    windows = select_windows(eval_windows(documents, tokenizer, s.seq_len), tokenizer, s.max_windows)
    limit = model.config.max_position_embeddings
    examples = {context: list(needle_grid(tokenizer, [context], s.depths, task="passkey", samples=s.samples,
                                          seed=s.seed, documents=documents, capacity=limit - 8))
                for context in s.contexts}
    prompts = code_prompts(documents, tokenizer, 1, s.prompt_tokens, s.seed)
    greedy = variants.decoders("greedy")[0].fn
    rows: list[dict[str, Any]] = []
    bf16_bytes = None
    for name, (factory, lossless) in cache_factories(s).items():
        quality = perplexity(model, windows, cache=factory, chunk=s.chunk, batch_size=s.batch_size)
        nbytes = factory(model.config, 1, s.memory_capacity).nbytes()
        bf16_bytes = nbytes if name == "dense_bf16" else bf16_bytes
        speed = measure_generation(greedy, model, prompts, max_new_tokens=s.new_tokens, repeats=1,
                                   cache=factory, key=s.seed, stop_tokens=())
        row = dict(cache=name, lossless=lossless, bits_per_byte=quality.bits_per_byte, memory_bytes=nbytes,
                   memory_mib=nbytes / 2**20, decode_tokens_per_s=speed.decode_tokens_per_second,
                   output=speed.output.sequences()[0])
        for context, found in examples.items():
            result = retrieval_accuracy(model, tokenizer, found, decoder=greedy, cache=factory,
                                        batch_size=len(s.depths), max_new_tokens=8, key=s.seed)
            row[f"passkey_{context}"] = result.exact_match
        rows.append(row)
        log(f"[kv_quant] {name}: bits/byte {row['bits_per_byte']:.4f}, {row['memory_mib']:.2f} MiB, "
            f"{row['decode_tokens_per_s']:.1f} tok/s, passkey "
            + ", ".join(f"{c}: {row[f'passkey_{c}']:.2f}" for c in s.contexts))
    dense = rows[0]
    dense_output = dense["output"]
    for row in rows:
        row["memory_ratio_vs_bf16"] = bf16_bytes / row["memory_bytes"]
        row["bits_per_byte_increase"] = row["bits_per_byte"] / dense["bits_per_byte"] - 1
        row["speed_vs_dense"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        row["greedy_agrees_with_dense"] = row.pop("output") == dense_output
    peers, peer_skipped = peer_rows(s, windows, log)
    control = next((p["bits_per_byte"] for p in peers if p["cache"] == "transformers_dynamic"), None)
    for p in peers:
        p["bits_per_byte_increase"] = p["bits_per_byte"] / control - 1
    metrics = dict(rows=rows, peer=peers, peer_skipped=peer_skipped, machine=machine_info(),
                   model=str(resolve_model_path(s.model_path)), windows=len(windows.tokens), seq_len=s.seq_len,
                   chunk=s.chunk, memory_capacity=s.memory_capacity, settings=dataclasses.asdict(s))
    columns = (("cache", "cache", "s"), ("bits_per_byte", "bits/byte", ".4f"),
               ("bits_per_byte_increase", "vs dense", "+.2%"), ("memory_mib", "MiB", ".2f"),
               ("memory_ratio_vs_bf16", "bf16/x", ".2f"), ("decode_tokens_per_s", "tok/s", ".1f"),
               *((f"passkey_{c}", f"passkey@{c}", ".2f") for c in s.contexts))
    table = format_table(rows, columns)
    if peers:
        table += "\n\n" + format_table(peers, (("cache", "peer", "s"), ("bits_per_byte", "bits/byte", ".4f"),
                                              ("bits_per_byte_increase", "vs its float", "+.2%")))
    elif peer_skipped:
        table += f"\n\npeer skipped: {peer_skipped}"
    table += (f"\n{len(windows.tokens)} windows of {s.seq_len} tokens, chunks of {s.chunk}; memory: one row of "
              f"{s.memory_capacity} slots; KIVI groups of {s.group_size}, residual {s.residual_length}")
    return ExperimentResult(metrics=metrics, table=table, figures={"kv_quant": plot(rows)})
