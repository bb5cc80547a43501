"""EAGLE-style feature drafting: the draft model's cache against a full forward, the dynamic
tree's choice, exactness of speculative decoding with it (greedy, sampling, ragged batches),
training on self-distillation data, and refusals of mismatched drafters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.speculative import assert_matches_greedy, exact_pair_law
from helpers.tiny import tiny_model
from scipy import stats

from efficient.cache.dense import DenseKVCache
from efficient.cache.evicting import EvictingKVCache
from efficient.cache.press import StreamingLLMPress
from efficient.decoding import generate
from efficient.decoding.drafters.eagle import EagleDrafter
from efficient.decoding.drafters.eagle_model import (
    FeatureDraftModel,
    load_feature_drafter,
    save_feature_drafter,
)
from efficient.decoding.generate import prefill_in_chunks
from efficient.decoding.online_width import OnlineWidth
from efficient.decoding.sampling import Sample
from efficient.decoding.speculative import speculative_generate, verify_widths
from efficient.models import forward
from efficient.models.forward import forward_embeddings
from efficient.models.model import fit_cache_to_layers
from efficient.train.config import TrainConfig
from efficient.train.distill import (
    load_self_distillation,
    target_fingerprint,
    write_self_distillation,
)
from efficient.train.eagle import evaluate_feature_drafter, train_feature_drafter

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11, 12, 13]]


def _drafter(model, **kwargs) -> EagleDrafter:  # noqa: ANN001
    draft = FeatureDraftModel.create(model, rngs=nnx.Rngs(1))
    vocab = np.arange(model.config.vocab_size - 1, -1, -1)
    return EagleDrafter.create(model, draft, vocab, **kwargs)


def test_forward_all_hidden_is_the_hidden_at_every_token() -> None:
    model = tiny_model()
    tokens = jnp.asarray([[3, 4, 5, 6]])
    logits, _, every = forward(model, tokens, logits_indices=jnp.asarray([[3]]), return_hidden="all")
    _, _, each = forward(model, tokens, return_hidden=True)
    np.testing.assert_allclose(every, each, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 0], model.logits(every)[:, 3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="return_hidden"):
        forward(model, tokens, return_hidden="some")


def test_chunked_prefill_returns_every_prompt_feature() -> None:
    """An evicting cache prefills in chunks of max_step: the features at every prompt token
    equal one forward's (budget above the prompt, so nothing is evicted)."""
    model = tiny_model()
    tokens = jnp.asarray([[3 + i for i in range(11)], [5 + i for i in range(11)]])
    lengths = jnp.asarray([11, 7])
    positions = jnp.where(jnp.arange(11)[None] < lengths[:, None], jnp.arange(11)[None], -1)
    cache = EvictingKVCache.for_model(model.config, 2, 32, press=StreamingLLMPress(sinks=1), budget=24, max_step=4)
    logits, _, every = prefill_in_chunks(model, tokens, positions, lengths, cache, None, all_hidden=True)
    _, _, each = forward(model, tokens, positions=positions, return_hidden=True)
    assert every.shape == each.shape
    for row, n in enumerate((11, 7)):
        np.testing.assert_allclose(every[row, :n], each[row, :n], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits[row, 0], model.logits(each)[row, n - 1], rtol=1e-4, atol=1e-4)


def test_forward_embeddings_refuses_bad_inputs() -> None:
    model = tiny_model()
    d = model.config.hidden_size
    positions = jnp.arange(3)[None]
    hidden, _ = forward_embeddings(model, model.embed(jnp.asarray([[3, 4, 5]])), positions=positions)
    np.testing.assert_allclose(hidden, forward(model, jnp.asarray([[3, 4, 5]]), return_hidden=True)[2],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_size"):
        forward_embeddings(model, jnp.zeros((1, 3, d + 1)), positions=positions)
    with pytest.raises(TypeError, match="positions"):
        forward_embeddings(model, jnp.zeros((1, 3, d)), positions=positions.astype(jnp.float32))


def test_draft_model_with_a_cache_equals_one_forward() -> None:
    model = tiny_model()
    draft = FeatureDraftModel.create(model, rngs=nnx.Rngs(0))
    d = model.config.hidden_size
    features = jax.random.normal(jax.random.key(0), (1, 6, d))
    tokens = jnp.asarray([[3, 4, 5, 6, 7, 8]])
    positions = jnp.arange(6)[None]
    full, _ = draft(features, model.embed(tokens), positions=positions)
    cache = fit_cache_to_layers(draft.body, DenseKVCache.for_model(draft.body.config, 1, 16))
    first, cache = draft(features[:, :4], model.embed(tokens[:, :4]), positions=positions[:, :4], cache=cache)
    rest, _ = draft(features[:, 4:], model.embed(tokens[:, 4:]), positions=positions[:, 4:], cache=cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [dict(tree_size=6, depth=3, beam=2, branch=3),
                                   dict(tree_size=1, depth=1, beam=1, branch=1),
                                   dict(tree_size=12, depth=4, beam=3, branch=3)])
def test_greedy_output_equals_generate(shape: dict) -> None:
    model = tiny_model()
    drafter = _drafter(model, **shape)
    out = assert_matches_greedy(model, drafter, PROMPTS, max_new_tokens=24)
    assert out.stats.row_steps <= 2 * 24
    assert len(out.stats.proposed_by_depth) == shape["depth"]


def test_tree_keeps_the_candidates_of_highest_path_probability() -> None:
    """Hand-built candidates: root children a (log p -0.1), b (-1.0), c (-3.0); under a: d (-0.3),
    e (-2.5); under b: f (-1.2). The 4 best paths are a, d, b, f; e and c are dropped."""
    model = tiny_model()
    drafter = _drafter(model, tree_size=4, depth=2, beam=2, branch=3)
    scores = jnp.asarray([[-0.1, -1.0, -3.0, -0.3, -2.5, -9.0, -1.2, -9.5, -9.9]])
    ids = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7, 8]])  # draft-vocabulary indices
    parent = jnp.asarray([[-1, -1, -1, 0, 0, 0, 1, 1, 1]])
    tree = drafter._select(scores, ids, parent, jnp.asarray([True]))
    vocab = np.asarray(drafter.vocab)
    np.testing.assert_array_equal(tree.tokens[0], vocab[[0, 3, 1, 6]])  # best first: every prefix is a tree
    np.testing.assert_array_equal(tree.parents[0], [-1, 0, -1, 2])
    assert bool(jnp.all(tree.valid))
    inactive = drafter._select(scores, ids, parent, jnp.asarray([False]))
    assert not bool(jnp.any(inactive.valid))


@pytest.mark.parametrize("pays", [False, True])
def test_online_width_drafts_only_when_it_pays(pays: bool) -> None:
    """A goodput table where no width pays: every step is a plain one (no node verified), the
    output still greedy's; where width 4 pays: it drafts, verifying at most 4 nodes."""
    model = tiny_model()
    seconds = (1.0, 1.0, 1.0) if pays else (1.0, 100.0, 100.0)
    online = OnlineWidth(widths=(0, 4, 8), seconds=seconds, expected=(1.0, 3.0, 2.0))
    drafter = _drafter(model, tree_size=8, depth=3, beam=2, branch=3, online=online)
    assert drafter.prefix_widths == (0, 4, 8)
    assert verify_widths(8, False, drafter.prefix_widths) == (0, 4, 8) and verify_widths(8, False) == (8,)
    out = assert_matches_greedy(model, drafter, PROMPTS, max_new_tokens=16)
    if pays:
        assert sum(out.stats.proposed_by_depth) > 0
    else:
        assert out.stats.proposed_by_depth == (0, 0, 0) and out.stats.draft_tokens_accepted == 0
    with pytest.raises(ValueError, match="online"):
        _drafter(model, tree_size=4, depth=3, beam=2, branch=3, online=online)


def test_sampled_output_follows_the_target_law() -> None:
    """Rows of one batch are independent samples: the (x1, x2) pairs of speculative sampling
    with an EAGLE tree (point masses) follow the target's law (chi-square, fixed seed)."""
    v = 7
    target = tiny_model(0, vocab_size=v)
    drafter = _drafter(target, tree_size=6, depth=3, beam=2, branch=3)
    rule = Sample(temperature=1.0, top_k=5)
    prompt, n = [1, 2, 3], 2000
    out = speculative_generate(target, [prompt] * n, drafter=drafter, max_new_tokens=3, sampling=rule, key=4,
                               stop_tokens=())
    seqs = np.asarray(out.tokens)
    law = np.asarray(exact_pair_law(target, prompt, rule), np.float64)
    keep = law.ravel() > 0
    counts = np.bincount(seqs[:, 0] * v + seqs[:, 1], minlength=v * v)
    assert counts[~keep].sum() == 0
    expected = law.ravel()[keep] / law.ravel()[keep].sum() * n
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3
    assert out.stats.draft_tokens_accepted > 0


def test_bad_shapes_and_foreign_drafters_are_refused(tmp_path) -> None:  # noqa: ANN001
    model = tiny_model()
    draft = FeatureDraftModel.create(model, rngs=nnx.Rngs(0))
    vocab = np.arange(10)
    with pytest.raises(ValueError, match="tree_size"):
        EagleDrafter.create(model, draft, vocab, tree_size=0)
    with pytest.raises(ValueError, match="candidates"):
        EagleDrafter.create(model, draft, vocab, tree_size=50, depth=2, beam=2, branch=2)
    with pytest.raises(ValueError, match="beam"):
        EagleDrafter.create(model, draft, vocab, tree_size=4, depth=2, beam=3, branch=2)
    with pytest.raises(ValueError, match="depth"):
        EagleDrafter.create(model, draft, vocab, depth=0)
    with pytest.raises(ValueError, match="vocab"):
        EagleDrafter.create(model, draft, np.asarray([model.config.vocab_size]), tree_size=1, depth=1, beam=1,
                            branch=1)
    other = tiny_model(hidden_size=model.config.hidden_size * 2)
    with pytest.raises(ValueError, match="hidden size"):
        EagleDrafter.create(other, draft, vocab, tree_size=4, depth=2, beam=2, branch=2)
    save_feature_drafter(draft, vocab, tmp_path / "d", {"target": target_fingerprint(model.config)})
    np.testing.assert_array_equal(load_feature_drafter(tmp_path / "d", model.config).vocab, vocab)
    with pytest.raises(ValueError, match="another model"):
        load_feature_drafter(tmp_path / "d", other.config)
    with pytest.raises(FileNotFoundError, match="feature drafter"):
        load_feature_drafter(tmp_path / "missing", model.config)


def test_training_lowers_the_loss_and_round_trips(tmp_path) -> None:  # noqa: ANN001
    model = tiny_model()
    prompts = [[3 + i, 4 + i, 5 + i, 6 + i] for i in range(8)]
    write_self_distillation(model, prompts, tmp_path / "data", new_tokens=16, batch_size=4)
    data = load_self_distillation(tmp_path / "data", model.config)
    train, val = data.split(2)
    config = TrainConfig(batch_size=4, seq_len=12, steps=40, peak_lr=3e-3, warmup_steps=2, weight_decay=0.0,
                         checkpoint_every=20, log_every=10)
    logs: list[str] = []
    run = train_feature_drafter(model, train, val, draft_vocab=model.config.vocab_size, config=config,
                                workdir=tmp_path / "work", log=logs.append)
    untrained = FeatureDraftModel.create(model, rngs=nnx.Rngs(config.data_seed))
    before = evaluate_feature_drafter(model, untrained, run.vocab, train)
    after = evaluate_feature_drafter(model, run.model, run.vocab, train)
    assert after > before + 0.2, (before, after)
    save_feature_drafter(run.model, run.vocab, tmp_path / "out", {"target": run.record["target"]})
    loaded = load_feature_drafter(tmp_path / "out", model.config)
    assert evaluate_feature_drafter(model, loaded.model, loaded.vocab, train) > before + 0.15  # bfloat16 round trip
    drafter = EagleDrafter.create(model, loaded.model, loaded.vocab, tree_size=6, depth=3, beam=2, branch=3)
    reference = generate(model, prompts[:2], max_new_tokens=16, stop_tokens=())
    out = speculative_generate(model, prompts[:2], drafter=drafter, max_new_tokens=16, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    # resumed: nothing left to train
    again = train_feature_drafter(model, train, val, draft_vocab=model.config.vocab_size, config=config,
                                  workdir=tmp_path / "work", log=logs.append)
    assert any("resumed at step 40" in line for line in logs)
    assert again.record["steps"] == 40
