"""Speculative decoders in the variant registry (`efficient.registry`).

Each entry builds its drafter from the harness's resources and options, then
runs `speculative_generate`: greedy entries reproduce greedy decoding exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient.decoding.drafters import (
    Drafter,
    DraftModelDrafter,
    LayerSkipDrafter,
    LookaheadDrafter,
    PromptLookupDrafter,
    TokenRecyclingDrafter,
    calibrate_skip_layers,
)
from efficient.cache.protocol import CacheFactory
from efficient.decoding.drafters.base import DraftContext, PromptContext
from efficient.decoding.drafters.eagle import EagleDrafter
from efficient.decoding.drafters.eagle_model import LoadedFeatureDrafter
from efficient.decoding.drafters.medusa import LoadedHeads, MedusaDrafter, expected_accepted, medusa_tree
from efficient.decoding.generate import GenerateOutput, generate
from efficient.decoding.goodput import WidthChoice, choose_width, verification_seconds
from efficient.decoding.online_width import OnlineWidth
from efficient.decoding.sampling import Greedy
from efficient.decoding.speculative import speculative_generate
from efficient.eval.timing import median_seconds
from efficient.models import LlamaModel
from efficient.registry import Decoder, register_decoder

DrafterBuilder = Callable[..., Drafter]  # (target model, **options) -> Drafter


def speculative_decoder(build: DrafterBuilder) -> Decoder:
    """A registry decoder that drafts with `build(model, **options)` and verifies greedily."""

    def decode(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               cache: CacheFactory | None = None, key: jax.Array | int | None = None,
               stop_tokens: Sequence[int] = (), **options: Any) -> GenerateOutput:
        drafter = build(model, **options)
        return speculative_generate(model, prompts, drafter=drafter, max_new_tokens=max_new_tokens,
                                    sampling=Greedy(), cache=cache, key=key, stop_tokens=stop_tokens)

    decode.__doc__ = build.__doc__
    return decode


def _draft_model(model: LlamaModel, *, draft_model: LlamaModel, length: int = 4) -> Drafter:
    """Chain of `length` tokens from the draft model."""
    return DraftModelDrafter.create(draft_model, model.config, length=length)


def _draft_adaptive(model: LlamaModel, *, draft_model: LlamaModel, length: int = 8,
                    stop_threshold: float = 0.6) -> Drafter:
    """Draft-model chain of up to `length` tokens, stopped by SpecDec++'s rule."""
    return DraftModelDrafter.create(draft_model, model.config, length=length, stop_threshold=stop_threshold)


register_decoder("spec_draft", speculative_decoder(_draft_model), lossless=True, needs=("draft_model",),
                 description="Speculative decoding: draft model chain of 4, greedy verification",
                 paper="Leviathan et al. 2023; Chen et al. 2023")
register_decoder("spec_adaptive", speculative_decoder(_draft_adaptive), lossless=True, needs=("draft_model",),
                 description="Draft model with SpecDec++ adaptive length (stop at P(reject) > 0.6, at most 8)",
                 paper="Huang et al. 2024 (SpecDec++)")


_CALIBRATIONS: dict[tuple[int, bytes, int], tuple[LlamaModel, tuple[int, ...]]] = {}


def _layer_skip(model: LlamaModel, *, calibration_tokens: np.ndarray, length: int = 4) -> Drafter:
    """The target drafts with the layers a short calibration chose (SWIFT); the choice is
    cached per (model, calibration text, length)."""
    tokens = np.asarray(calibration_tokens, np.int32)
    key = (id(model), tokens.tobytes(), length)
    cached = _CALIBRATIONS.get(key)
    if cached is None or cached[0] is not model:  # the model is kept, so its id is not reused
        cached = (model, calibrate_skip_layers(model, tokens, length=length).skip_layers)
        _CALIBRATIONS[key] = cached
    return LayerSkipDrafter.create(model.config, skip_layers=cached[1], length=length)


register_decoder("spec_layer_skip", speculative_decoder(_layer_skip), lossless=True, needs=("calibration_tokens",),
                 description="Self-speculative: the target with calibrated layers skipped drafts a chain of 4",
                 paper="Xia et al. 2024 (SWIFT); Zhang et al. 2023 (Draft & Verify)")


def _lookahead(model: LlamaModel, *, window: int = 5, ngram: int = 4, candidates: int = 4) -> Drafter:
    """Jacobi window chain plus n-gram pool candidates (lookahead decoding)."""
    del model
    return LookaheadDrafter.create(window=window, ngram=ngram, candidates=candidates)


register_decoder("spec_lookahead", speculative_decoder(_lookahead), lossless=True,
                 description="Lookahead: Jacobi window of 5 + 4 pooled 4-grams, verified as one tree",
                 paper="Fu et al. 2024 (Lookahead decoding)")


def _prompt_lookup(model: LlamaModel, *, length: int = 16, max_ngram: int = 4, min_ngram: int = 1) -> Drafter:
    """Copy the continuation of the longest earlier match of the recent suffix."""
    del model
    return PromptLookupDrafter.create(length=length, max_ngram=max_ngram, min_ngram=min_ngram)


def _recycling(model: LlamaModel) -> Drafter:
    """A 25-node tree expanded from the adjacency matrix of recycled top-k candidates."""
    del model
    return TokenRecyclingDrafter.create()


register_decoder("spec_prompt_lookup", speculative_decoder(_prompt_lookup), lossless=True,
                 description="Prompt lookup / CopySpec: copy up to 16 tokens after the longest n-gram match",
                 paper="Saxena 2023 (prompt lookup); Dumitru et al. 2025 (CopySpec)")
register_decoder("spec_recycling", speculative_decoder(_recycling), lossless=True,
                 description="Token Recycling: 25-node tree from the recycled top-k adjacency matrix",
                 paper="Luo et al. 2024 (Token Recycling)")


_WIDTHS: dict[tuple[str, int, int, int, int, bytes], tuple[LlamaModel, WidthChoice]] = {}
MEDUSA_WIDTHS = (1, 2, 4, 8, 16)
# Not 16: verifying 16 nodes cost 2.2-2.9x a plain step on this CPU (78-99 ms against 27-37 ms at
# batch 1), which the drafter's 1.75 calibrated tokens per step there never paid for.
EAGLE_WIDTHS = (2, 4, 8)
CALIBRATION_NEW_TOKENS = 32


def goodput_width(name: str, model: LlamaModel, resource: object, build: Callable[[int], Drafter],
                  widths: Sequence[int], *, batch: int, context: int, calibration_tokens: np.ndarray | None,
                  draft_seconds: Callable[[], float],
                  estimate: Callable[[int], float] | None = None) -> WidthChoice:
    """The tree size of largest goodput for this model, batch and context (SmartSpec): the
    verification of 1 + w tokens and the drafter's own step (`draft_seconds()`) timed here;
    tokens per step measured by decoding `calibration_tokens` (held-out rows, as prompts) with
    `build(w)`, or, without them, `estimate(w)`. 0 (plain decoding) unless a width pays by the
    margin. Cached per (name, model, resource, batch, context rounded up to 64, calibration text)."""
    context = -(-context // 64) * 64
    calibration = None if calibration_tokens is None else np.asarray(calibration_tokens, np.int32)
    key = (name, id(model), id(resource), batch, context, b"" if calibration is None else calibration.tobytes())
    cached = _WIDTHS.get(key)
    if cached is not None and cached[0] is model:
        return cached[1]
    if calibration is None and estimate is None:
        raise ValueError(f"{name}: tokens per step need calibration_tokens or an estimate")
    seconds = verification_seconds(model, (0, *widths), batch=batch, context=context)
    expected = {}
    for w in widths:
        if calibration is None:
            expected[w] = estimate(w)
        else:
            out = speculative_generate(model, calibration, drafter=build(w), max_new_tokens=CALIBRATION_NEW_TOKENS,
                                       stop_tokens=())
            expected[w] = out.stats.mean_accepted_tokens
    choice = choose_width(expected, seconds, draft_seconds=draft_seconds())
    _WIDTHS[key] = (model, choice)
    return choice


def width_choices(name: str) -> list[dict[str, object]]:
    """Every goodput choice `name` made in this process: batch, context, whether tokens per step
    were measured on calibration text, and the `WidthChoice` table."""
    return [{"batch": key[3], "context": key[4], "calibrated": bool(key[5]), **choice.as_dict()}
            for key, (_, choice) in _WIDTHS.items() if key[0] == name]


def medusa_width(model: LlamaModel, loaded: LoadedHeads, *, batch: int, context: int,
                 calibration_tokens: np.ndarray | None = None) -> WidthChoice:
    """`goodput_width` for Medusa heads; without calibration text, tokens per step are Medusa's
    independence estimate from the heads' held-out accuracy (which overestimates: 1.64 against
    1.38-1.51 measured for 4 nodes on SmolLM2)."""
    head_weight = model.lm_head_rows(loaded.heads.vocab)
    top = int(loaded.accuracy.shape[1])
    draft = jax.jit(lambda h: jax.lax.top_k(loaded.heads.logits(h, head_weight), top)[1])
    hidden = jnp.zeros((batch, model.config.hidden_size), jnp.float32)
    return goodput_width(
        "medusa", model, loaded,
        lambda w: MedusaDrafter.create(model, loaded.heads, accuracy=loaded.accuracy, tree_size=w),
        MEDUSA_WIDTHS, batch=batch, context=context, calibration_tokens=calibration_tokens,
        draft_seconds=lambda: median_seconds(draft, hidden),
        estimate=lambda w: expected_accepted(loaded.accuracy, medusa_tree(loaded.accuracy, w)))


def sized_by_goodput(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     cache: CacheFactory | None, key: jax.Array | int | None, stop_tokens: Sequence[int],
                     tree_size: int, choose: Callable[[int, int], int],
                     build: Callable[[int], Drafter]) -> GenerateOutput:
    """Greedy speculative decoding with `build(tree_size)`; `tree_size` 0: `choose(batch, context)`
    picks it (context: the longest prompt + half the new tokens), and 0 from it means plain decoding."""
    if tree_size == 0:
        tree_size = choose(len(prompts), max(len(p) for p in prompts) + max_new_tokens // 2)
        if tree_size == 0:
            return generate(model, prompts, max_new_tokens=max_new_tokens, cache=cache, key=key,
                            stop_tokens=stop_tokens)
    return speculative_generate(model, prompts, drafter=build(tree_size), max_new_tokens=max_new_tokens,
                                sampling=Greedy(), cache=cache, key=key, stop_tokens=stop_tokens)


def _medusa(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            cache: CacheFactory | None = None, key: jax.Array | int | None = None,
            stop_tokens: Sequence[int] = (), medusa_heads: LoadedHeads, calibration_tokens: np.ndarray,
            tree_size: int = 0) -> GenerateOutput:
    """Medusa-1 heads drafting a static tree; `tree_size` 0: chosen by goodput with tokens per
    step measured on `calibration_tokens` (plain greedy decoding when no tree is expected to pay)."""
    def choose(batch: int, context: int) -> int:
        return medusa_width(model, medusa_heads, batch=batch, context=context,
                            calibration_tokens=calibration_tokens).width

    def build(w: int) -> Drafter:
        return MedusaDrafter.create(model, medusa_heads.heads, accuracy=medusa_heads.accuracy, tree_size=w)

    return sized_by_goodput(model, prompts, max_new_tokens=max_new_tokens, cache=cache, key=key,
                            stop_tokens=stop_tokens, tree_size=tree_size, choose=choose, build=build)


register_decoder("spec_medusa", _medusa, lossless=True, needs=("medusa_heads", "calibration_tokens"),
                 description="Medusa-1 heads (trained by self-distillation) drafting a static tree sized by goodput",
                 paper="Cai et al. 2024 (Medusa); Liu et al. 2024 (SmartSpec)")


# EAGLE-2's expansion (top-4 beam, top-4 children) over 4 levels, not its 5-6: on SmolLM2 the drafter's
# depth-4 acceptance was already below 0.1, and each level costs ~2 ms per step on this CPU (9.3 ms for
# 4 levels against 11.2 for 5 at batch 1, 384 tokens of context).
EAGLE_SHAPE = dict(depth=4, beam=4, branch=4)


def eagle_drafter(model: LlamaModel, loaded: LoadedFeatureDrafter, tree_size: int,
                  online: OnlineWidth | None = None) -> EagleDrafter:
    """The benchmark's EAGLE drafter (`EAGLE_SHAPE`) with `tree_size` nodes."""
    return EagleDrafter.create(model, loaded.model, loaded.vocab, tree_size=tree_size, online=online, **EAGLE_SHAPE)


def eagle_draft_seconds(model: LlamaModel, drafter: EagleDrafter, *, batch: int, context: int) -> float:
    """Median seconds of one `propose` (feeding a full step's pending pairs, every level of the
    dynamic tree) at this batch and context, its state built from zero features."""
    d = model.config.hidden_size
    zeros_b = jnp.zeros((batch,), jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    history = jnp.zeros((batch, context + drafter.tree_size + 2), jnp.int32)
    features = jnp.zeros((batch, context, d), jnp.float32)
    prompt = PromptContext(tokens=history[:, :context], lengths=lengths, history=history, first_token=zeros_b,
                           target=model, rule=Greedy(), hidden=features[:, -1], prompt_hidden=features)
    state = jax.jit(lambda: drafter.init(prompt))()
    state = dataclasses.replace(state, count=jnp.full((batch,), drafter.max_depth + 1, jnp.int32),
                                start=lengths - drafter.max_depth)
    ctx = DraftContext(history=history, last_position=lengths, last_token=zeros_b, active=zeros_b == 0,
                       key=jax.random.key(0), target=model, cache=None, rule=Greedy())
    propose = jax.jit(lambda st: drafter.propose(st, ctx)[0].tokens)
    return median_seconds(propose, state)


def eagle_width(model: LlamaModel, loaded: LoadedFeatureDrafter, *, batch: int, context: int,
                calibration_tokens: np.ndarray) -> WidthChoice:
    """`goodput_width` for the EAGLE drafter over `EAGLE_WIDTHS` nodes of its dynamic tree."""
    def build(w: int) -> EagleDrafter:
        return eagle_drafter(model, loaded, w)

    return goodput_width("eagle", model, loaded, build, EAGLE_WIDTHS, batch=batch, context=context,
                         calibration_tokens=calibration_tokens,
                         draft_seconds=lambda: eagle_draft_seconds(model, build(max(EAGLE_WIDTHS)), batch=batch,
                                                                   context=context))


def _eagle(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           cache: CacheFactory | None = None, key: jax.Array | int | None = None,
           stop_tokens: Sequence[int] = (), feature_drafter: LoadedFeatureDrafter, calibration_tokens: np.ndarray,
           tree_size: int = 0) -> GenerateOutput:
    """EAGLE-style feature drafter with EAGLE-2's dynamic tree; `tree_size` 0: the goodput table
    (tokens per step measured on `calibration_tokens`) picks plain greedy decoding when no width
    pays, else each step's width with acceptance re-estimated online (`OnlineWidth`)."""
    if tree_size == 0:
        choice = eagle_width(model, feature_drafter, batch=len(prompts),
                             context=max(len(p) for p in prompts) + max_new_tokens // 2,
                             calibration_tokens=calibration_tokens)
        if choice.width == 0:
            return generate(model, prompts, max_new_tokens=max_new_tokens, cache=cache, key=key,
                            stop_tokens=stop_tokens)
        drafter = eagle_drafter(model, feature_drafter, max(EAGLE_WIDTHS), OnlineWidth.from_choice(choice))
    else:
        drafter = eagle_drafter(model, feature_drafter, tree_size)
    return speculative_generate(model, prompts, drafter=drafter, max_new_tokens=max_new_tokens, sampling=Greedy(),
                                cache=cache, key=key, stop_tokens=stop_tokens)


register_decoder("spec_eagle", _eagle, lossless=True, needs=("feature_drafter", "calibration_tokens"),
                 description="EAGLE-style feature drafter (one trained layer) with EAGLE-2's dynamic tree, its width "
                             "per step by goodput with acceptance re-estimated online",
                 paper="Li et al. 2024 (EAGLE, EAGLE-2); Liu et al. 2024 (SmartSpec)")
