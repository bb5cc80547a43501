"""The pure forward every other module uses: prefill of a chunk, or decode.

    logits, cache = forward(model, tokens, positions=..., cache=...)

The L layers run as one `lax.scan` over their stacked parameters (compile time
flat in depth), carrying the hidden state and the cache, which is written and
read at the traced layer index. Per-layer differences are traced per-layer
values: a kind id selects the layer's static `AttentionSpec` (window) with
`lax.switch` and its RoPE table, and an optional skip gate makes the layer the
identity (`lax.cond`; a skipped layer does not write the cache). A model whose
layers were unstacked (`set_layer_loop(model, "unrolled")`, for XLA:CPU) runs the
same layer body as a Python loop, with static layer indices and kinds (and reads
a cache split into per-layer buffers, `fit_cache_to_layers`).

`positions[b, t] < 0` marks a padded token: it is written to the cache with
position -1 (never attended) and its logits are meaningless. Without a cache
the call attends within `tokens` only; with one, it appends the T tokens to
each row and attends over everything the row holds.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient.attention import AttentionSpec, DenseView, attention
from efficient.attention.sparse_prefill import dense_keys, sparse_prefill_attention
from efficient.cache.protocol import KVCache
from efficient.models.checks import (
    check_cache_matches,
    check_int_array,
    check_logits_indices,
    check_model,
    check_positions,
)
from efficient.models.model import DecoderModel as LlamaModel
from efficient.models.rope import rotary_cos_sin


def _is_concrete(x: object) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_tokens(tokens: jax.Array | np.ndarray, vocab_size: int, name: str = "tokens") -> None:
    """Rank, dtype and (when concrete) id range of a token array."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have rank 2 [B, T], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {tokens.dtype}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tokens.shape)}")
    if _is_concrete(tokens):
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds id {bad} outside the vocabulary [0, {vocab_size})")


def check_capacity(cache: KVCache, num_tokens: int) -> None:
    """Raise if appending `num_tokens` would overflow a concrete cache (inside jit the
    lengths are traced; callers such as `generate` check capacity up front)."""
    if _is_concrete(cache.lengths):
        longest = int(np.max(np.asarray(cache.lengths)))
        if longest + num_tokens > cache.capacity:
            raise ValueError(
                f"appending {num_tokens} tokens to a cache row holding {longest} exceeds its "
                f"capacity {cache.capacity}"
            )


def check_step_size(cache: KVCache, num_tokens: int, fresh: bool) -> None:
    """Raise if a cache that bounds what one forward may append (a ring buffer for
    sliding-window layers) is given more tokens than that, outside a fresh prefill."""
    fresh_limit = getattr(cache, "max_tokens_per_fresh_forward", None)
    if fresh and fresh_limit is not None and num_tokens > fresh_limit:
        raise ValueError(
            f"forward: {num_tokens} tokens in one forward exceed the {fresh_limit} that this {type(cache).__name__} "
            "holds beyond its budget (max_step), even in a prefill; prefill in chunks of at most that size "
            "(`generate` does) or build the cache with a larger max_step")
    limit = getattr(cache, "max_tokens_per_forward", None)
    if limit is not None and not fresh and num_tokens > limit:
        raise ValueError(
            f"forward: {num_tokens} tokens in one forward exceed the {limit} that this {type(cache).__name__} "
            "keeps the window for (its ring holds window + max_step - 1 entries); prefill an empty cache with "
            "fresh_cache=True, use chunks of at most that size, or build the cache with a larger max_step")


def _with_new_token_mask(
    mask: Bool[Array, "B T S"] | None, tree_mask: Bool[Array, "B T T"], slots: Int[Array, "B T"] | None,
    cache: KVCache | None, b: int, t: int,
) -> Bool[Array, "B T S"]:
    """Scatter the [B, T, T] visibility among new tokens into the [B, T, S] mask (the
    cache's view is indexed by slot; older slots stay visible, positions decide)."""
    if tree_mask.shape != (b, t, t) or tree_mask.dtype != jnp.bool_:
        raise ValueError(f"tree_mask must be bool with shape {(b, t, t)}, got {tree_mask.dtype}{tuple(tree_mask.shape)}")
    if cache is None:
        return tree_mask if mask is None else mask & tree_mask
    full = jnp.ones((b, t, cache.capacity), jnp.bool_)
    rows = jnp.arange(b)[:, None, None]
    queries = jnp.arange(t)[None, :, None]
    full = full.at[rows, queries, slots[:, None, :]].set(tree_mask, mode="drop")
    return full if mask is None else mask & full


def forward(
    model: LlamaModel,
    tokens: Int[Array, "B T"],
    *,
    positions: Int[Array, "B T"] | None = None,
    cache: KVCache | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    tree_mask: Bool[Array, "B T T"] | None = None,
    logits_indices: Int[Array, "B I"] | None = None,
    implementation: str | tuple[str, ...] | None = None,
    skip_layers: tuple[int, ...] | Bool[Array, " L"] = (),
    fresh_cache: bool = False,
    return_hidden: bool | str = False,
) -> tuple[Float[Array, "B I V"], KVCache | None] | tuple[Float[Array, "B I V"], KVCache | None, Float[Array, "B I D"]]:
    """Run the decoder over `tokens`; returns float32 logits and the updated cache
    (and, with `return_hidden`, the final-normed hidden state the LM head reads, at the
    same token indices as the logits: what Medusa heads read; `return_hidden="all"`: at
    every token, whatever `logits_indices` says, as a feature-level drafter's prefill needs).

    positions: per-token positions (default: following the cache's last
        position, or 0..T-1 without a cache). Negative = padding.
    mask: extra visibility over [B, T, S] where S is the cache capacity (or T
        without a cache).
    tree_mask: visibility among the T new tokens themselves ([b, t, j]: token t
        sees new token j), e.g. a draft tree's ancestor mask for speculative
        verification; what the cache held before is governed by positions alone.
    logits_indices: compute logits only at these token indices (e.g. the last
        real token of each prompt); default every token.
    skip_layers: layers run as the identity (self-speculative drafting): a tuple of
        layer ids, or a (possibly traced) bool[L] mask, so different sets share one
        compile. A skipped layer does not write the cache.
    fresh_cache: the cache holds nothing before this call (a prefill): the new
        tokens are written to it, but attention reads them directly ([B, T]
        keys), not the cache's whole capacity.

    Checked before anything runs (typed errors naming the argument): `model` is a
    model (not a config), `tokens` and `positions` are integer arrays (a float
    position array is refused, not truncated), concrete positions lie below
    `max_position_embeddings` (except dynamic-NTK RoPE, which scales past it; traced
    positions inside jit are not checked), and the cache matches the model (layers,
    KV heads, head size, a floating dtype) and the batch.
    """
    config = check_model(model, "forward")
    if return_hidden not in (False, True, "all") or isinstance(return_hidden, int) and not isinstance(
            return_hidden, bool):
        raise ValueError(f"forward: return_hidden must be False, True or 'all', got {return_hidden!r}")
    check_int_array(tokens, "tokens", "forward")
    validate_tokens(tokens, config.vocab_size)
    b, t = tokens.shape
    if cache is not None:
        check_cache_matches(config, cache, b, "forward")
    if positions is not None:
        check_positions(positions, config, "forward")
    if logits_indices is not None:
        check_logits_indices(logits_indices, b, t, "forward")
    if positions is None:
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            positions = cache.next_positions(t)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape != (b, t):
        raise ValueError(f"positions must have shape {(b, t)}, got {tuple(positions.shape)}")
    x, cache = _layers_over(model, model.embed(tokens), positions, cache, mask, tree_mask,
                            skip_mask(skip_layers, config.num_layers), implementation, fresh_cache)
    every_hidden = model.norm(x) if return_hidden == "all" else None
    if logits_indices is not None:
        if logits_indices.ndim != 2 or logits_indices.shape[0] != b:
            raise ValueError(f"logits_indices must have shape [{b}, I], got {tuple(logits_indices.shape)}")
        if _is_concrete(logits_indices) and logits_indices.size and (
            int(np.min(logits_indices)) < 0 or int(np.max(logits_indices)) >= t
        ):
            raise ValueError(f"logits_indices must lie in [0, {t}), got {np.asarray(logits_indices).tolist()}")
        x = jnp.take_along_axis(x, logits_indices[:, :, None], axis=1)
    hidden = model.norm(x)
    if return_hidden:
        return model.logits(hidden), cache, hidden if every_hidden is None else every_hidden
    return model.logits(hidden), cache


def _layers_over(model: LlamaModel, x: Float[Array, "B T D"], positions: Int[Array, "B T"], cache: KVCache | None,
                 mask: Bool[Array, "B T S"] | None, tree_mask: Bool[Array, "B T T"] | None,
                 skip: Bool[Array, " L"] | None, implementation: str | tuple[str, ...] | None,
                 fresh_cache: bool) -> tuple[Float[Array, "B T D"], KVCache | None]:
    """Reserve the cache slots, build the mask, run the layers over the input vectors `x`;
    returns the last layer's output (before the final norm) and the cache."""
    config = model.config
    b, t = positions.shape
    # A sharded model (efficient.parallel.shard_model): constraints at layer boundaries.
    sharding = getattr(model, "sharding", None)
    # A prefill into an empty cache with no extra mask attends its new tokens directly.
    attend_new_only = fresh_cache and mask is None and tree_mask is None
    slots = None
    if cache is not None:
        if cache.batch_size != b:
            raise ValueError(f"cache batch size {cache.batch_size} != tokens batch size {b}")
        check_capacity(cache, t)
        check_step_size(cache, t, attend_new_only)
        cache, slots = cache.reserve(positions)
        if sharding is not None:
            cache = sharding.constrain_cache(cache)
    if tree_mask is not None:
        mask = _with_new_token_mask(mask, tree_mask, slots, cache, b, t)
    x, cache = _run_layers(model, x, positions, cache, slots, mask, skip,
                           implementation or config.attention_implementation, attend_new_only)
    if sharding is not None and cache is not None:
        cache = sharding.constrain_cache(cache)
    return x, cache


def forward_embeddings(
    model: LlamaModel,
    inputs: Float[Array, "B T D"],
    *,
    positions: Int[Array, "B T"],
    cache: KVCache | None = None,
    tree_mask: Bool[Array, "B T T"] | None = None,
    implementation: str | tuple[str, ...] | None = None,
    fresh_cache: bool = False,
) -> tuple[Float[Array, "B T D"], KVCache | None]:
    """The decoder over input vectors instead of token ids (a feature-level drafter feeds
    its fused [feature, token embedding] vectors): returns the final-normed hidden state
    [B, T, D] at every token and the cache; no logits. Arguments as `forward`'s."""
    config = check_model(model, "forward_embeddings")
    check_int_array(positions, "positions", "forward_embeddings")
    check_positions(positions, config, "forward_embeddings")
    b, t, d = inputs.shape
    if d != config.hidden_size or positions.shape != (b, t):
        raise ValueError(f"forward_embeddings: inputs [B, T, D] {tuple(inputs.shape)} and positions "
                         f"{tuple(positions.shape)} must agree, with D = hidden_size {config.hidden_size}")
    if cache is not None:
        check_cache_matches(config, cache, b, "forward_embeddings")
    x, cache = _layers_over(model, inputs.astype(model.dtype), jnp.asarray(positions, jnp.int32), cache, None,
                            tree_mask, None, implementation, fresh_cache)
    return model.norm(x), cache


def skip_mask(skip_layers: tuple[int, ...] | Bool[Array, " L"], num_layers: int) -> Bool[Array, " L"] | None:
    """A bool[L] mask from layer ids or a mask (None: no layer skipped, statically)."""
    if isinstance(skip_layers, tuple | list):
        if not skip_layers:
            return None
        bad = [i for i in skip_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"skip_layers: layer ids {bad} outside [0, {num_layers})")
        flags = np.zeros((num_layers,), bool)
        flags[list(skip_layers)] = True
        return jnp.asarray(flags)
    skip_layers = jnp.asarray(skip_layers)
    if skip_layers.shape != (num_layers,) or skip_layers.dtype != jnp.bool_:
        raise ValueError(f"skip_layers must be layer ids or a bool[{num_layers}] mask, got "
                         f"{skip_layers.dtype}{tuple(skip_layers.shape)}")
    return skip_layers


def _materialised_tables(
    cos: Float[Array, "R B T H"], sin: Float[Array, "R B T H"], positions: Int[Array, "B T"]
) -> tuple[Float[Array, "R B T H"], Float[Array, "R B T H"]]:
    """The RoPE tables computed once per forward, not once per use.

    XLA:CPU fused cos and sin into every layer's q and k rotation, evaluating them per head
    and per layer (unrolled SmolLM2 prefill of 4096 tokens: ~10 ms of ~340 ms per layer), and
    it expands `optimization_barrier` before fusion, so a conditional (never fused into) holds
    them. Its predicate is real: a chunk of padding only (no position >= 0) needs no tables.
    Only for chunks of 64 tokens or more: decode steps keep no conditional in their loop.
    """
    if positions.shape[1] < 64:  # a decode or verify step: too few positions to matter
        return cos, sin
    return jax.lax.cond(jnp.any(positions >= 0), lambda: (cos, sin),
                        lambda: (jnp.zeros_like(cos), jnp.zeros_like(sin)))


def _run_layers(
    model: LlamaModel,
    x: Float[Array, "B T D"],
    positions: Int[Array, "B T"],
    cache: KVCache | None,
    slots: Int[Array, "B T"] | None,
    mask: Bool[Array, "B T S"] | None,
    skip: Bool[Array, " L"] | None,
    implementation: str | tuple[str, ...] | None,
    attend_new_only: bool = False,
) -> tuple[Float[Array, "B T D"], KVCache | None]:
    """`lax.scan` over the stacked layers, carrying (x, cache)."""
    config = model.config
    sharding = getattr(model, "sharding", None)

    def boundary(x: jax.Array) -> jax.Array:
        """The hidden state [B, T, D] at a layer boundary: split by batch (and tokens, under a
        sequence rule) on a sharded model."""
        return x if sharding is None else sharding.constrain(x, ("batch", "seq", "embed"))

    x = boundary(x)
    kinds, kind_ids = config.layer_kinds()
    scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar**-0.5
    specs = tuple(AttentionSpec(causal=True, window=window, softcap=config.attn_logit_softcapping, scale=scale)
                  for window, _ in kinds)
    # RoPE tables of every kind [kinds, B, T, H]; padding (negative positions) gets position 0.
    tables = [rotary_cos_sin(rope, config.head_dim, config.max_position_embeddings, jnp.maximum(positions, 0))
              for _, rope in kinds]
    cos_all, sin_all = _materialised_tables(
        jnp.stack([cos for cos, _ in tables]), jnp.stack([sin for _, sin in tables]), positions)

    # A cache whose views differ by window (the hybrid cache's ring for sliding layers) is
    # read inside the kind's branch, where the window and so the view's shape are static.
    per_kind_views = cache is not None and not attend_new_only and getattr(cache, "views_differ_by_window", False)
    # A cache whose view is not laid out by logical slot (a ring, a quantized store and its
    # residual) maps a mask over logical slots onto its view.
    maps_mask = mask is not None and cache is not None and not attend_new_only and hasattr(cache, "view_mask")
    masks = [cache.view_mask(mask, spec.window) if maps_mask else mask for spec in specs]
    # A cache that scores its keys (eviction) gets the attention mass of each layer's queries.
    key_stats = getattr(cache, "key_stats", None) if cache is not None else None
    # A model sharded with a sequence rule prefills with ring attention (Liu et al., 2023: each
    # device keeps its tokens' queries and passes its keys and values around the sequence axis)
    # or DeepSpeed-Ulysses (all-to-all from tokens to heads), as its ModelSharding says.
    ring = (sharding is not None and sharding.sequence_axis() is not None and key_stats is None
            and (cache is None or attend_new_only) and positions.shape[1] % sharding.mesh.shape[
                sharding.sequence_axis()] == 0)
    # Patterns of MInference-style sparse prefill (efficient.attention.sparse_prefill), if attached.
    sparse = getattr(model, "sparse_prefill", None)
    if key_stats is not None and attend_new_only and key_stats.tail is not None:
        key_stats = dataclasses.replace(key_stats, tail=None)  # a fresh forward's view is its new tokens
    if key_stats is not None and skip is not None:
        raise ValueError(f"forward: a {type(cache).__name__} that scores keys does not serve skip_layers "
                         "(a skipped layer's attention would give it no statistics)")

    def attend_kinds(q: jax.Array, kind: jax.Array, cache: KVCache | None, index: jax.Array,
                     view: object | None) -> jax.Array:
        """Attention of the layer kind `kind` over `view`, or (view None) over the cache's
        view for that kind's window (with `key_stats`: (out, mass))."""
        def branch(j: int) -> Callable[[jax.Array], jax.Array]:
            def run(q: jax.Array) -> jax.Array:
                if ring and view is not None and masks[j] is None:  # a prefill's own tokens, split by tokens
                    return sharding.sequence_attention(q, view.k, view.v, positions, specs[j])
                seen = view if view is not None else cache.view(index, window=specs[j].window)
                keys = (dense_keys(seen) if sparse is not None and isinstance(seen, DenseView)
                        and q.shape[1] >= sparse.min_tokens and masks[j] is None and key_stats is None else None)
                if keys is not None:  # MInference: the layer's head patterns over a dense view
                    k, v, kv_positions = keys
                    return sparse_prefill_attention(q, k, v, positions, kv_positions, sparse, index, spec=specs[j],
                                                    implementation=implementation)
                return attention(q, seen, spec=specs[j], q_positions=positions, mask=masks[j],
                                 key_stats=key_stats, implementation=implementation)
            return run

        if len(specs) == 1:
            return branch(0)(q)
        if isinstance(kind, int):  # unstacked layers: the kind is static
            return branch(kind)(q)
        return jax.lax.switch(kind, [branch(j) for j in range(len(specs))], q)

    def shared_view(cache: KVCache | None, index: jax.Array, k: jax.Array, v: jax.Array) -> object | None:
        """What every kind reads (None: read per kind from the cache)."""
        if cache is None or attend_new_only:
            return DenseView(k=k, v=v, positions=positions)
        return None if per_kind_views else cache.view(index)

    unstacked = isinstance(model.layers, nnx.List)
    if unstacked:
        graphdef = nnx.graphdef(model.layers[0])
        per_layer = [nnx.state(layer) for layer in model.layers]
    else:
        graphdef, stacked = nnx.split(model.layers)

    def layer_step(params: nnx.State, x: jax.Array, cache: KVCache | None, index: jax.Array,
                   kind: jax.Array) -> tuple[jax.Array, KVCache | None]:
        layer = nnx.merge(graphdef, params)
        written = [cache]

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            if written[0] is not None:
                written[0] = written[0].update(index, k, v, slots)
            out = attend_kinds(q, kind, written[0], index, shared_view(written[0], index, k, v))
            if key_stats is None:
                return out
            out, mass = out
            written[0] = written[0].observe(index, mass, positions)
            return out

        x = layer(x, cos_all[kind], sin_all[kind], attend)
        return boundary(x), written[0]

    def gated_step(params: nnx.State, x: jax.Array, cache: KVCache | None, index: jax.Array, kind: jax.Array,
                   skipped: jax.Array) -> tuple[jax.Array, KVCache | None]:
        """A layer behind a traced skip gate. The cache never enters the `lax.cond` as an
        output: a cache passed through a conditional is copied whole (XLA gives its output
        its own buffer), which made every gated layer copy the full stacked cache. So the
        keys and values (a small part of the layer) are computed and written outside it, to
        dropped slots when skipped, and the conditional reads the layer's view and returns
        x only."""
        layer = nnx.merge(graphdef, params)
        k, v = layer.project_kv(x, cos_all[kind], sin_all[kind])
        if cache is not None:
            cache = cache.update(index, k, v, jnp.where(skipped, cache.capacity, slots))
        view = shared_view(cache, index, k, v)

        def run(x: jax.Array) -> jax.Array:
            def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:  # k, v: already written
                return attend_kinds(q, kind, cache, index, view)

            return nnx.merge(graphdef, params)(x, cos_all[kind], sin_all[kind], attend)

        return boundary(jax.lax.cond(skipped, lambda x: x, run, x)), cache

    def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        x, cache = carry
        params, index, kind, skipped = xs
        if skipped is None:
            return layer_step(params, x, cache, index, kind), None
        return gated_step(params, x, cache, index, kind, skipped), None

    if unstacked:  # one buffer per layer: a Python loop, no weight slice copied per layer
        carry = (x, cache)
        for i, params in enumerate(per_layer):
            gate = None if skip is None else skip[i]
            carry, _ = body(carry, (params, i, kind_ids[i], gate))
        return carry
    if getattr(cache, "per_layer", False):
        raise ValueError("forward: cache holds per-layer buffers (split_layers) but the model's layers run "
                         "under lax.scan with a traced layer index; pass cache.stack_layers(), or "
                         "set_layer_loop(model, 'unrolled')")
    xs = (stacked, jnp.arange(config.num_layers, dtype=jnp.int32), jnp.asarray(kind_ids, jnp.int32), skip)
    (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
    return x, cache


def jit_forward(
    model: LlamaModel, *, implementation: str | tuple[str, ...] | None = None, donate_cache: bool = True,
    check_values: bool = True,
) -> Callable[..., tuple[jax.Array, KVCache | None]]:
    """A compiled `forward` for this model: `fn(tokens, positions=None, cache=None,
    mask=None, logits_indices=None, tree_mask=None) -> (logits, cache)`.

    The module is split once into (graphdef, params); params are a jit argument,
    never static, and the cache buffer is donated (do not reuse the cache you
    pass in).

    check_values: also check what needs the arrays' values (token ids inside the
        vocabulary, positions below the limit, logits indices in range, room in
        the cache), each a device-to-host sync per call. Shapes, dtypes and the
        cache's match with the model are always checked. Pass False in a step
        loop whose inputs are already trusted (the sync would stall the device).
    """
    config = check_model(model, "jit_forward")
    graphdef, params = nnx.split(model)

    def run(params, tokens, positions, cache, mask, logits_indices, tree_mask):  # noqa: ANN001, ANN202
        merged = nnx.merge(graphdef, params)
        return forward(merged, tokens, positions=positions, cache=cache, mask=mask, tree_mask=tree_mask,
                       logits_indices=logits_indices, implementation=implementation)

    compiled = jax.jit(run, donate_argnums=(3,) if donate_cache else ())

    def call(tokens, positions=None, cache=None, mask=None, logits_indices=None, tree_mask=None):  # noqa: ANN001, ANN202
        check_int_array(tokens, "tokens", "jit_forward", rank=2)
        if cache is not None:
            check_cache_matches(config, cache, tokens.shape[0], "jit_forward")
        if not check_values:
            for value, name in ((positions, "positions"), (logits_indices, "logits_indices")):
                if value is not None:
                    check_int_array(value, name, "jit_forward")
            return compiled(params, tokens, positions, cache, mask, logits_indices, tree_mask)
        validate_tokens(tokens, config.vocab_size)
        if positions is not None:
            check_positions(positions, config, "jit_forward")
        if logits_indices is not None:
            check_logits_indices(logits_indices, tokens.shape[0], tokens.shape[1], "jit_forward")
        if cache is not None:
            check_capacity(cache, tokens.shape[1])
        return compiled(params, tokens, positions, cache, mask, logits_indices, tree_mask)

    return call
