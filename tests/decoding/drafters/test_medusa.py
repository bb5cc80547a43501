"""Medusa-1 heads: the hidden state the loop hands them, the tree they draft, the verifier's
exactness with them, training on self-distillation data, and refusals of mismatched heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import tiny_model

from efficient.decoding import generate
from efficient.decoding.drafters.base import DraftContext, VerifyOutcome
from efficient.decoding.drafters.medusa import (
    MedusaDrafter,
    MedusaHeads,
    expected_accepted,
    load_medusa_heads,
    medusa_tree,
    save_medusa_heads,
)
from efficient.decoding.sampling import Greedy, Sample
from efficient.decoding.speculative import speculative_generate
from efficient.models import forward
from efficient.train.config import TrainConfig
from efficient.train.distill import (
    load_self_distillation,
    target_fingerprint,
    write_self_distillation,
    write_teacher_forced,
)
from efficient.train.medusa import label_indices, rank_accuracy, train_medusa

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]


def _random_heads(model, num_heads: int = 3, seed: int = 0) -> MedusaHeads:  # noqa: ANN001
    d, v = model.config.hidden_size, model.config.vocab_size
    k1, k2 = jax.random.split(jax.random.key(seed))
    return MedusaHeads(weight=jax.random.normal(k1, (num_heads, d, d)) * 0.5,
                       bias=jax.random.normal(k2, (num_heads, d)) * 0.1, vocab=jnp.arange(v - 3, -1, -1))


def test_forward_returns_the_hidden_state_the_lm_head_reads() -> None:
    model = tiny_model()
    tokens = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10]])
    logits, _, hidden = forward(model, tokens, return_hidden=True, logits_indices=jnp.asarray([[1, 3], [0, 2]]))
    assert hidden.shape == (2, 2, model.config.hidden_size)
    np.testing.assert_allclose(logits, model.logits(hidden), rtol=1e-6)
    plain, _ = forward(model, tokens)
    np.testing.assert_allclose(logits[0], plain[0, [1, 3]], rtol=1e-5, atol=1e-5)


def test_tree_takes_the_nodes_of_largest_path_acceptance() -> None:
    accuracy = np.asarray([[0.6, 0.2], [0.5, 0.1]])
    depth, parent, rank = medusa_tree(accuracy, 4)
    # 0.6 (d1 r0), 0.3 (d2 r0 under it), 0.2 (d1 r1), 0.1 (d2 r0 under d1 r1) -- then 0.06 ...
    assert (depth, parent, rank) == ((1, 2, 1, 2), (-1, 0, -1, 2), (0, 0, 1, 0))
    assert expected_accepted(accuracy, (depth, parent, rank)) == pytest.approx(1 + 0.6 + 0.3 + 0.2 + 0.1)
    with pytest.raises(ValueError, match="node budget"):
        medusa_tree(accuracy, 0)


def test_propose_drafts_each_nodes_ranked_candidate_and_update_follows_the_accepted_path() -> None:
    model = tiny_model()
    heads = _random_heads(model)
    accuracy = np.asarray([[0.5, 0.3, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]])
    drafter = MedusaDrafter.create(model, heads, accuracy=accuracy, tree_size=7)
    b, d = 2, model.config.hidden_size
    state = jax.random.normal(jax.random.key(1), (b, d))
    ctx = DraftContext(history=jnp.zeros((b, 8), jnp.int32), last_position=jnp.asarray([3, 4]),
                       last_token=jnp.asarray([1, 2]), active=jnp.asarray([True, False]), key=jax.random.key(0),
                       target=model, cache=None, rule=Greedy())
    tree, _, _ = drafter.propose(state, ctx)
    # By hand: the target's LM head on each head's features, read over the (reversed) draft
    # vocabulary, then each node's rank.
    h = np.asarray(state)
    for row in range(b):
        for node, (dd, r) in enumerate(zip(drafter.depth, drafter.rank, strict=True)):
            z = h[row] + np.asarray(jax.nn.silu(h[row] @ np.asarray(heads.weight[dd - 1]) + np.asarray(heads.bias[dd - 1])))
            full = np.asarray(model.logits(jnp.asarray(z)[None, None]))[0, 0]
            order = np.argsort(-full[np.asarray(heads.vocab)], kind="stable")
            assert int(tree.tokens[row, node]) == int(heads.vocab[order[r]])
    assert tree.valid[0].all() and not tree.valid[1].any()  # inactive rows draft nothing
    np.testing.assert_array_equal(tree.parents[0], drafter.parent)
    # update: the hidden state where the target chose its next token.
    w = drafter.tree_size
    hidden = jnp.broadcast_to(jnp.arange(w + 1, dtype=jnp.float32)[None, :, None], (b, w + 1, d))
    path = jnp.asarray([[0, 1, -1, -1, -1, -1, -1], [-1] * 7])
    outcome = VerifyOutcome(tree=tree, valid=tree.valid, logits=None, hidden=hidden, path=path,
                            num_accepted=jnp.asarray([2, 0]), new_tokens=None, num_new=None, history=None,
                            last_position=None)
    ctx_both = DraftContext(**{**ctx.__dict__, "active": jnp.asarray([True, True])})
    new = drafter.update(state, ctx_both, outcome)
    np.testing.assert_array_equal(new[:, 0], [2.0, 0.0])  # node 1 (index 2); nothing accepted: the root (0)
    kept = drafter.update(state, ctx, outcome)  # an inactive row keeps its state
    np.testing.assert_array_equal(kept[1], state[1])


@pytest.mark.parametrize("tree_size", [1, 6])
def test_greedy_output_equals_generate_and_sampling_is_deterministic(tree_size: int) -> None:
    model = tiny_model()
    accuracy = np.full((3, 3), 0.3)
    drafter = MedusaDrafter.create(model, _random_heads(model), accuracy=accuracy, tree_size=tree_size)
    reference = generate(model, PROMPTS, max_new_tokens=10, stop_tokens=())
    out = speculative_generate(model, PROMPTS, drafter=drafter, max_new_tokens=10, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    rule = Sample(temperature=0.8)
    one = speculative_generate(model, PROMPTS, drafter=drafter, max_new_tokens=10, sampling=rule, key=4, stop_tokens=())
    two = speculative_generate(model, PROMPTS, drafter=drafter, max_new_tokens=10, sampling=rule, key=4, stop_tokens=())
    np.testing.assert_array_equal(one.tokens, two.tokens)


def test_heads_trained_on_the_targets_own_continuations_get_drafts_accepted(tmp_path) -> None:  # noqa: ANN001
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, model.config.vocab_size, size=(24, 6)).tolist()
    write_self_distillation(model, prompts, tmp_path / "data", new_tokens=24, batch_size=8, log=lambda _: None)
    data = load_self_distillation(tmp_path / "data", model.config)
    assert data.hidden.shape == (24, 24, model.config.hidden_size) and data.tokens.shape == (24, 24)
    np.testing.assert_array_equal(data.tokens[:8], generate(model, prompts[:8], max_new_tokens=24,
                                                            stop_tokens=()).tokens)
    train, val = data.split(8)
    labels = label_indices(train.tokens, 2, np.arange(model.config.vocab_size), model.config.vocab_size)
    assert labels[0, 0, 1] == train.tokens[0, 2] and labels[0, -1, 0] == -1
    config = TrainConfig(batch_size=8, seq_len=16, steps=400, peak_lr=1e-2, warmup_steps=10, weight_decay=0.0,
                         grad_clip_norm=0.0, checkpoint_every=0, log_every=0)
    run = train_medusa(model, train, val, num_heads=2, draft_vocab=model.config.vocab_size, config=config,
                       workdir=tmp_path / "heads", ranks=3, log=lambda _: None)
    untrained = MedusaHeads.init(2, model.config.hidden_size, np.asarray(run.heads.vocab))
    drafters = {name: MedusaDrafter.create(model, heads, accuracy=run.accuracy, tree_size=4)
                for name, heads in (("trained", run.heads), ("untrained", untrained))}
    # The heads fit what they were trained on (a random target's continuations of random prompts do
    # not generalise): on those prompts, decoding accepts more drafts than with untrained heads. A
    # label or hidden-state index off by one would fit tokens the verifier never asks for.
    seen = prompts[:2]
    accepted = {name: speculative_generate(model, seen, drafter=d, max_new_tokens=24,
                                           stop_tokens=()).stats.mean_accepted_tokens
                for name, d in drafters.items()}
    train_labels = label_indices(train.tokens, 2, np.asarray(run.heads.vocab), model.config.vocab_size)
    fit = {name: rank_accuracy(d.heads, d.head_weight, train.hidden, train_labels, 1)[:, 0]
           for name, d in drafters.items()}
    assert (fit["trained"] > fit["untrained"] + 0.2).all(), fit
    assert accepted["trained"] > accepted["untrained"] + 0.3, accepted
    # Saved in bfloat16 and loaded back for this target; refused for another.
    save_medusa_heads(run.heads, tmp_path / "out", {"target": target_fingerprint(model.config),
                                                    "accuracy": run.accuracy.tolist()})
    loaded = load_medusa_heads(tmp_path / "out", model.config)
    np.testing.assert_allclose(loaded.heads.weight, run.heads.weight, rtol=1e-2, atol=1e-3)
    np.testing.assert_array_equal(loaded.accuracy, run.accuracy)
    other = tiny_model(hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=48.*another model"):
        load_medusa_heads(tmp_path / "out", other.config)
    with pytest.raises(ValueError, match="another model"):
        load_self_distillation(tmp_path / "data", other.config)


def test_teacher_forced_labels_are_greedy_decodings_tokens_and_masked_off_the_path(tmp_path) -> None:  # noqa: ANN001
    model = tiny_model()
    prompt = [5, 6, 7, 8, 9, 10]
    greedy = generate(model, [prompt], max_new_tokens=12, stop_tokens=()).tokens[0].tolist()
    on_path = prompt + greedy  # text that follows the greedy path from its 6th token on
    off_path = list(on_path)
    off_path[10] = (on_path[10] + 1) % model.config.vocab_size  # leaves the path after position 9
    write_teacher_forced(model, [on_path, off_path], tmp_path / "t", batch_size=2, log=lambda _: None)
    data = load_self_distillation(tmp_path / "t", model.config)
    assert data.follows[0, 5:17].all() and not data.follows[1, 9]
    np.testing.assert_array_equal(data.tokens[0, 5:17], greedy[:12])  # the choice at each position
    vocab = np.arange(model.config.vocab_size)
    labels = label_indices(data.tokens, 3, vocab, model.config.vocab_size, data.follows)
    for k in (1, 2, 3):  # head k at the prompt's end: greedy decoding's token k steps after the root
        assert labels[0, 5, k - 1] == greedy[k]
    # Off the path: a label exists only if the text followed the path up to it.
    assert labels[1, 8, 0] == data.tokens[1, 9] and labels[1, 8, 1] == -1 and labels[1, 7, 2] == -1
    assert labels[1, 9, 0] == -1 and labels[1, 10, 0] == (data.tokens[1, 11] if data.follows[1, 10] else -1)


def test_mismatched_heads_and_bad_arguments_are_refused() -> None:
    model = tiny_model()
    accuracy = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="hidden size 48.*hidden_size 32.*another model"):
        MedusaDrafter.create(model, _random_heads(tiny_model(hidden_size=48)), accuracy=accuracy)
    wide = _random_heads(model)
    wide = MedusaHeads(weight=wide.weight, bias=wide.bias, vocab=jnp.asarray([0, 1, 500]))
    with pytest.raises(ValueError, match="vocabulary.*500.*another model"):
        MedusaDrafter.create(model, wide, accuracy=accuracy)
    with pytest.raises(ValueError, match="accuracy must be \\[3 heads"):
        MedusaDrafter.create(model, _random_heads(model), accuracy=np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="node budget"):
        MedusaDrafter.create(model, _random_heads(model), accuracy=accuracy, tree_size=0)
    with pytest.raises(ValueError, match="num_heads"):
        MedusaHeads.init(0, 32, np.arange(4))
    with pytest.raises(ValueError, match="distinct"):
        MedusaHeads.init(2, 32, np.asarray([1, 1]))
    with pytest.raises(ValueError, match="batch_size 9 exceeds"):
        write_self_distillation(model, [[1, 2]] * 4, "/nonexistent", new_tokens=2, batch_size=9)
    with pytest.raises(ValueError, match="one length"):
        write_self_distillation(model, [[1, 2], [1, 2, 3]], "/nonexistent", new_tokens=2, batch_size=1)
