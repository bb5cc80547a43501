"""Evicting KV caches on the real model: what each press keeps, measured.

On the embedded default (SmolLM2-135M-Instruct), for each policy (the presses
StreamingLLM, H2O, TOVA and SnapKV with one budget for every layer and head; PyramidKV's
budgets falling with depth; retrieval heads keeping everything while the other heads keep
a sink and a window, the heads found by RazorAttention's calibration or by the attention
answers give to needles on synthetic retrieval prompts) and kept fraction of the context
(memory: the average budget per layer and head):
- **bits/byte** of held-out stdlib windows fed through the cache in chunks (every
  chunk evicts down to the budget first), against the dense cache;
- StreamingLLM's claim: over a text 4x the budget, a window-only cache (no sinks)
  against sinks plus window;
- **retrieval** (`kv_prose`: KEY lines in prose, asked at the end) in two settings
  that papers mix up: *question-aware* (context and question prefilled together, the
  cache compressed before the answer is decoded: SnapKV's setting) and
  *question-agnostic* (the context prefilled and compressed first, the question
  appended after, as a cache reused across questions must be: kvpress's setting);
- **memory and decode step time** against the context length: a bounded cache
  stays flat.
Run through `experiments.run`; configs/kv_evict.py.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient.cache import DenseKVCache, EvictingKVCache, StreamingLLMPress
from efficient.cache.budgets import retrieval_head_budgets, retrieval_heads_for_fraction
from efficient.cache.press import PRESSES
from efficient.cache.retrieval_heads import head_scores, razor_retrieval_score, razor_scores
from efficient.cache.variants import press_cache
from efficient.data import eval_windows, needle_grid
from efficient.eval import perplexity, select_windows
from efficient.eval.retrieval import score_answer
from efficient.models import jit_forward, resolve_model_path
from experiments.common import (
    ExperimentResult,
    check_positive,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
    machine_info,
)

HEAD_POLICIES = ("razor", "needle_heads")  # retrieval heads from a calibration (scores [L, K])
POLICIES = (*PRESSES, "pyramidkv", *HEAD_POLICIES)
QUESTION_MARK = "\nWhat is the value of KEY-"  # where a kv_prose "quiz" prompt's question starts


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    presses: tuple[str, ...]
    kept: tuple[float, ...]
    seq_len: int
    max_windows: int
    batch_size: int
    chunk: int
    streaming_budget: int
    context_tokens: int
    depths: tuple[float, ...]
    samples: int
    retrieval_kept: tuple[float, ...]
    new_tokens: int
    speed_contexts: tuple[int, ...]
    speed_budget: int
    calibration_tokens: int
    seed: int

    def __post_init__(self) -> None:
        check_positive(self, "seq_len", "max_windows", "batch_size", "chunk", "streaming_budget", "context_tokens",
                       "samples", "new_tokens", "speed_budget", "calibration_tokens")
        for name in ("kept", "retrieval_kept"):
            bad = [k for k in getattr(self, name) if not 0 < k < 1]
            if bad:
                raise ValueError(f"config.{name.replace('_', '.', 1) if name != 'kept' else 'kept'}: fractions in "
                                 f"(0, 1), got {bad}")
        bad = [p for p in self.presses if p not in POLICIES]
        if bad:
            raise ValueError(f"config.presses: {bad} are not policies; choose from {list(POLICIES)}")
        if self.streaming_budget * 2 > self.seq_len:
            raise ValueError(f"config.streaming.budget={self.streaming_budget} must be at most half of "
                             f"config.perplexity.seq_len={self.seq_len} (the claim is about texts longer than it)")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    return Settings(
        model_path=str(config.model.path), presses=tuple(config.presses), kept=tuple(config.kept),
        seq_len=config.perplexity.seq_len, max_windows=config.perplexity.max_windows,
        batch_size=config.perplexity.batch_size, chunk=config.perplexity.chunk,
        streaming_budget=config.streaming.budget, context_tokens=config.retrieval.context_tokens,
        depths=tuple(config.retrieval.depths), samples=config.retrieval.samples,
        retrieval_kept=tuple(config.retrieval.kept), new_tokens=config.retrieval.new_tokens,
        speed_contexts=tuple(config.speed.contexts), speed_budget=config.speed.budget,
        calibration_tokens=config.calibration.tokens, seed=int(config.seed))


def evicting(press: str, budget: int, max_step: int, head_scores: dict[str, np.ndarray] | None = None
             ) -> Callable[..., EvictingKVCache]:
    """A cache factory for a policy keeping `budget` tokens per (layer, KV head) on average:
    a press (`press_for_budget`), "pyramidkv" (SnapKV's scores, PyramidKV's budgets), or a
    retrieval-head policy of HEAD_POLICIES (the best-scoring heads keep every token, as many
    as the average allows; the others 4 sinks and a window; `head_scores[policy]`)."""
    if press in HEAD_POLICIES:
        scores = (head_scores or {}).get(press)
        if scores is None:
            raise ValueError(f"policy {press!r} needs its calibrated head scores")
        streaming = max(8, min(64, budget // 2))

        def factory(config: Any, batch: int, capacity: int, dtype: Any = None) -> EvictingKVCache:
            heads = retrieval_heads_for_fraction(scores, capacity, streaming, kept=budget / capacity)
            table = retrieval_head_budgets(heads, capacity, streaming)
            return EvictingKVCache.for_model(config, batch, capacity, dtype, budget=table, max_step=max_step,
                                             press=StreamingLLMPress(sinks=4, window=streaming - 4))

        return factory
    return functools.partial(press_cache, press="snapkv" if press == "pyramidkv" else press, budget=budget,
                             max_step=max_step, pyramid=press == "pyramidkv")


def calibrate_heads(model: Any, tokenizer: Any, s: Settings, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Head scores [L, K] for the retrieval-head policies: RazorAttention's echo and
    induction scores on repeated random tokens, and the attention that answer tokens give
    on the queried needle line from the question on, on kv_prose prompts built with another
    seed than the evaluation's (DuoAttention's synthetic retrieval data; its gate
    optimisation is not done)."""
    try:
        return _calibrate_heads(model, tokenizer, s, log)
    except ValueError as e:
        raise ValueError(f"config.calibration.tokens={s.calibration_tokens}: {e}") from e


def _calibrate_heads(model: Any, tokenizer: Any, s: Settings, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    out = {}
    if "razor" in s.presses:
        echo, induction = razor_scores(model, batch=2, length=s.calibration_tokens // 2, seed=s.seed)
        out["razor"] = razor_retrieval_score(echo, induction)
    if "needle_heads" in s.presses:
        examples = needle_grid(tokenizer, [s.calibration_tokens], (0.2, 0.5, 0.8), task="kv_prose", samples=1,
                               seed=s.seed + 1, capacity=model.config.max_position_embeddings - 64)
        rows = [needle_reading_targets(tokenizer, e) for e in examples]
        width = max(len(tokens) for tokens, _ in rows)
        tokens = np.zeros((len(rows), width), np.int32)
        positions = np.full((len(rows), width), -1, np.int32)
        targets = np.zeros((len(rows), width, width), bool)
        for b, (row, target) in enumerate(rows):  # left-padded to one length
            pad = width - len(row)
            tokens[b, pad:], positions[b, pad:] = row, np.arange(len(row))
            targets[b, pad:, pad:] = target
        out["needle_heads"] = head_scores(model, tokens, targets, positions=positions)
    for name, scores in out.items():
        best = np.argsort(-scores.reshape(-1))[:6]
        log(f"[kv_evict] {name} calibration: best (layer, head) "
            f"{[divmod(int(i), scores.shape[1]) for i in best]}")
    return out


def needle_reading_targets(tokenizer: Any, example: Any) -> tuple[np.ndarray, np.ndarray]:
    """The prompt followed by its answer, and the keys [T, T] each query should read: the
    queried needle line, for the queries from the question on (those that locate the key
    and copy its value); none for the others."""
    line_end = example.prompt.index("\n", example.needle_char) + 1
    needle = slice(example.needle_token, len(tokenizer.encode(example.prompt[:line_end])))
    question = len(tokenizer.encode(example.prompt[:example.prompt.rindex(QUESTION_MARK)]))
    tokens = np.asarray(tokenizer.encode(example.prompt) + tokenizer.encode(" " + example.answer), np.int32)
    targets = np.zeros((len(tokens), len(tokens)), bool)
    targets[question:-1, needle] = True
    return tokens, targets


# ----------------------------------------------------------------------------- retrieval
def _left_pad(rows: Sequence[Sequence[int]], start: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """tokens [B, T] left-padded with 0 and their positions (start[b] + i; -1 on padding)."""
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    positions = np.full((len(rows), width), -1, np.int32)
    for b, row in enumerate(rows):
        tokens[b, width - len(row):] = row
        positions[b, width - len(row):] = start[b] + np.arange(len(row))
    return jnp.asarray(tokens), jnp.asarray(positions)


def answer_in_parts(model: Any, factory: Callable[..., Any], parts: Sequence[Sequence[Sequence[int]]],
                    new_tokens: int) -> list[list[int]]:
    """Greedy answers after feeding each prompt as consecutive parts (one forward per part,
    rows left-padded), through a cache built by `factory(config, batch, capacity)`."""
    b = len(parts[0])
    lengths = np.zeros(b, np.int64)
    capacity = sum(max(len(r) for r in part) for part in parts) + new_tokens
    cache = factory(model.config, b, capacity)
    step = jit_forward(model)
    for part in parts:
        tokens, positions = _left_pad(part, lengths)
        logits, cache = step(tokens, positions=positions, cache=cache,
                             logits_indices=jnp.full((b, 1), tokens.shape[1] - 1, jnp.int32))
        lengths += [len(r) for r in part]
    out = []
    for _ in range(new_tokens):
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(np.asarray(token))
        logits, cache = step(token[:, None], positions=jnp.asarray(lengths, jnp.int32)[:, None], cache=cache)
        lengths += 1
    return np.stack(out, axis=1).tolist()


def retrieval_rows(model: Any, tokenizer: Any, s: Settings, log: Callable[[str], None],
                   heads: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    examples = list(needle_grid(tokenizer, [s.context_tokens], s.depths, task="kv_prose", samples=s.samples,
                                seed=s.seed, capacity=model.config.max_position_embeddings - 64))
    contexts, questions = [], []
    for e in examples:
        cut = e.prompt.rindex(QUESTION_MARK)
        contexts.append(tokenizer.encode(e.prompt[:cut]))
        questions.append(tokenizer.encode(e.prompt[cut:]))
    whole = [c + q for c, q in zip(contexts, questions, strict=True)]
    longest = max(len(w) for w in whole)
    context_len = int(np.mean([len(c) for c in contexts]))

    def score(answers: list[list[int]]) -> tuple[float, float]:
        results = [score_answer(e.answer, tokenizer.decode(a)) for e, a in zip(examples, answers, strict=True)]
        return float(np.mean([r[0] for r in results])), float(np.mean([r[1] for r in results]))

    rows = []
    exact, digits = score(answer_in_parts(model, DenseKVCache.for_model, [whole], s.new_tokens))
    rows.append(dict(press="dense", kept=1.0, setting="both", exact=exact, digits=digits))
    log(f"[kv_evict] retrieval dense: {exact:.2f}")
    for kept in s.retrieval_kept:
        budget = max(8, int(kept * context_len))
        for press in s.presses:
            for setting, parts in (("aware", [whole]), ("agnostic", [contexts, questions])):
                factory = evicting(press, budget, max_step=longest, head_scores=heads)
                exact, digits = score(answer_in_parts(model, factory, parts, s.new_tokens))
                rows.append(dict(press=press, kept=kept, budget=budget, setting=setting, exact=exact, digits=digits))
                log(f"[kv_evict] retrieval {press} kept {kept:.3f} ({budget} tokens) {setting}: {exact:.2f}")
    return rows


# ----------------------------------------------------------------------------- speed
def prefilled(model: Any, factory: Callable[..., Any], context: int, chunk: int, steps: int) -> tuple[Any, Any]:
    """(jitted step, cache) after `context` random tokens, with room for `steps` more."""
    cache = factory(model.config, 1, context + steps)
    step = jit_forward(model)
    rng = np.random.default_rng(0)
    for start in range(0, context, chunk):
        size = min(chunk, context - start)
        ids = jnp.asarray(rng.integers(1, model.config.vocab_size, (1, size)), jnp.int32)
        _, cache = step(ids, cache=cache, logits_indices=jnp.zeros((1, 1), jnp.int32))
    return step, cache


def speed_rows(model: Any, s: Settings, log: Callable[[str], None], rounds: int = 3,
               repeats: int = 8) -> list[dict[str, Any]]:
    """Median ms of a decode step per (cache, context): every cache is prefilled first, then
    timed in `rounds` interleaved rounds of `repeats` steps (a shared machine's slow spells
    then hit every configuration alike)."""
    states = {}
    for context in s.speed_contexts:
        for press in ("dense", "streaming_llm", "h2o"):
            factory = DenseKVCache.for_model if press == "dense" else evicting(press, s.speed_budget, s.chunk)
            step, cache = prefilled(model, factory, context, 512 if press == "dense" else s.chunk,
                                    rounds * repeats + 2)
            token = jnp.ones((1, 1), jnp.int32)
            logits, cache = step(token, cache=cache)  # compile
            jax.block_until_ready(logits)
            states[press, context] = [step, cache, []]
    token = jnp.ones((1, 1), jnp.int32)
    for _ in range(rounds):
        for state in states.values():
            step, cache, times = state
            for _ in range(repeats):
                began = time.perf_counter()
                logits, cache = step(token, cache=cache)
                jax.block_until_ready(logits)
                times.append(time.perf_counter() - began)
            state[1] = cache
    rows = []
    for (press, context), (_, cache, times) in states.items():
        rows.append(dict(press=press, context=context, step_ms=1000 * float(np.median(times)),
                         memory_mib=cache.nbytes() / 2**20))
        log(f"[kv_evict] speed {press} at {context}: {rows[-1]['step_ms']:.1f} ms/step, "
            f"{rows[-1]['memory_mib']:.1f} MiB")
    return rows


# ----------------------------------------------------------------------------- quality
def quality_rows(model: Any, windows: Any, s: Settings, log: Callable[[str], None],
                 heads: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    def bpb(factory: Callable[..., Any]) -> float:
        return perplexity(model, windows, cache=factory, chunk=s.chunk, batch_size=s.batch_size).bits_per_byte

    dense = bpb(DenseKVCache.for_model)
    rows = [dict(press="dense", kept=1.0, bits_per_byte=dense, increase=0.0)]
    log(f"[kv_evict] bits/byte dense: {dense:.4f}")
    for kept in s.kept:
        budget = max(8, int(kept * s.seq_len))
        for press in s.presses:
            value = bpb(evicting(press, budget, s.chunk, head_scores=heads))
            rows.append(dict(press=press, kept=kept, budget=budget, bits_per_byte=value, increase=value / dense - 1))
            log(f"[kv_evict] bits/byte {press} kept {kept:.3f}: {value:.4f} ({value / dense - 1:+.2%})")
    for sinks in (0, 4):  # StreamingLLM's claim: a text 4x the budget, with and without sinks
        press = StreamingLLMPress(sinks=sinks, window=s.streaming_budget - sinks)
        value = bpb(functools.partial(EvictingKVCache.for_model, press=press, budget=s.streaming_budget,
                                      max_step=s.chunk))
        rows.append(dict(press="window_only" if sinks == 0 else "sinks_plus_window", kept=s.streaming_budget / s.seq_len,
                         budget=s.streaming_budget, bits_per_byte=value, increase=value / dense - 1))
        log(f"[kv_evict] bits/byte {rows[-1]['press']} (budget {s.streaming_budget}): {value:.4f} "
            f"({value / dense - 1:+.2%})")
    return rows


def plot(quality: list[dict[str, Any]], retrieval: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(10.0, 4.0))
    ax = fig.add_subplot(1, 2, 1)
    presses = sorted({r["press"] for r in quality if "budget" in r and r["press"] not in
                      ("window_only", "sinks_plus_window")})
    for press in presses:
        points = sorted((r["kept"], r["bits_per_byte"]) for r in quality if r["press"] == press)
        ax.plot(*zip(*points), marker="o", label=press)
    ax.axhline(quality[0]["bits_per_byte"], color="k", linestyle="--", label="dense")
    ax.set_xlabel("kept fraction")
    ax.set_ylabel("bits/byte")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    for setting, marker in (("aware", "o"), ("agnostic", "x")):
        for press in sorted({r["press"] for r in retrieval if r["setting"] == setting}):
            points = sorted((r["kept"], r["exact"]) for r in retrieval if r["press"] == press and r["setting"] == setting)
            ax.plot(*zip(*points), marker=marker, label=f"{press} ({setting})")
    dense = next(r["exact"] for r in retrieval if r["press"] == "dense")
    ax.axhline(dense, color="k", linestyle="--", label="dense")
    ax.set_xlabel("kept fraction")
    ax.set_ylabel("retrieval exact match")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    s = settings_from(config)
    model = load_model(s.model_path, dtype=config.model.dtype)
    tokenizer = load_tokenizer_for(s.model_path, config.model.tokenizer, model.config.vocab_size)
    documents = load_documents("stdlib", (".py",), "test")
    windows = select_windows(eval_windows(documents, tokenizer, s.seq_len), tokenizer, s.max_windows)
    heads = calibrate_heads(model, tokenizer, s, log)
    quality = quality_rows(model, windows, s, log, heads)
    retrieval = retrieval_rows(model, tokenizer, s, log, heads) if s.retrieval_kept else []
    speed = speed_rows(model, s, log) if s.speed_contexts else []
    metrics = dict(quality=quality, retrieval=retrieval, speed=speed, machine=machine_info(),
                   head_scores={name: scores.tolist() for name, scores in heads.items()},
                   model=str(resolve_model_path(s.model_path)), windows=len(windows.tokens),
                   settings=dataclasses.asdict(s))
    table = format_table(quality, (("press", "press", "s"), ("kept", "kept", ".3f"),
                                   ("bits_per_byte", "bits/byte", ".4f"), ("increase", "vs dense", "+.2%")))
    if retrieval:
        table += "\n\n" + format_table(retrieval, (("press", "press", "s"), ("kept", "kept", ".3f"),
                                                   ("setting", "setting", "s"), ("exact", "exact", ".2f"),
                                                   ("digits", "digits", ".2f")))
    if speed:
        table += "\n\n" + format_table(speed, (("press", "cache", "s"), ("context", "context", "d"),
                                               ("step_ms", "ms/step", ".1f"), ("memory_mib", "MiB", ".1f")))
    table += (f"\nbits/byte: {len(windows.tokens)} windows of {s.seq_len} tokens in chunks of {s.chunk}; "
              f"retrieval: kv_prose at {s.context_tokens} tokens, {len(s.depths) * s.samples} examples")
    figures = {"kv_evict": plot(quality, retrieval)} if retrieval else {}
    return ExperimentResult(metrics=metrics, table=table, figures=figures)
