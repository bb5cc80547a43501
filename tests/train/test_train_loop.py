"""Training loop: learning, deterministic resume, export round-trip, config errors, the script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.data import ByteTokenizer, Corpus, split_of
from efficient.models import LlamaModel, ModelConfig, forward, from_pretrained
from efficient.train import TrainConfig, evaluate, make_optimizer, make_train_fns, train, validation_set

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ("bisect", "colorsys", "abc", "fnmatch", "sched")  # ~26 KB
VAL_FILES = ("keyword", "token")  # ~3.4 KB
TINY = ModelConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=16, tie_embeddings=True, max_position_embeddings=128)
# bf16 exported weights vs float32 training weights: logits agree to bf16 rounding.
BF16_LOGITS_ATOL, BF16_LOGITS_RTOL = 5e-2, 2e-2


def _name_in(split: str, stem: str) -> str:
    return next(f"{stem}_{i}" for i in range(1000) if split_of(f"{stem}_{i}") == split)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few KB of stdlib text, named so that both train and validation splits are non-empty."""
    root = tmp_path_factory.mktemp("corpus")
    for stem in TRAIN_FILES:
        (root / f"{_name_in('train', stem)}.py").write_text((STDLIB / f"{stem}.py").read_text())
    for stem in VAL_FILES:
        (root / f"{_name_in('validation', stem)}.py").write_text((STDLIB / f"{stem}.py").read_text())
    return root


@pytest.fixture(scope="module")
def docs(corpus_dir: Path) -> tuple[list, list]:
    corpus = Corpus.from_folder(corpus_dir, suffixes=(".py",))
    return corpus.split("train"), corpus.split("validation")


def _config(**overrides: object) -> TrainConfig:
    base = dict(batch_size=4, seq_len=64, steps=30, peak_lr=3e-3, warmup_steps=5, eval_every=0,
                checkpoint_every=0, log_every=5, eval_max_windows=8)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(docs: tuple[list, list], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    out = tmp_path_factory.mktemp("export")
    work = tmp_path_factory.mktemp("work")
    result = train(TINY, _config(eval_every=15), *docs, ByteTokenizer(), workdir=work, output_dir=out,
                   log=lambda _: None)
    return result, work, out


def test_loss_decreases(trained) -> None:  # noqa: ANN001
    result, work, _ = trained
    logs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 6
    assert losses[0] > losses[-1] + 0.8, losses
    assert result.final_train_loss < math.log(259) - 1.0
    val = [r["val_bits_per_byte"] for r in logs if "val_bits_per_byte" in r]
    assert len(val) == 2 and val[-1] < val[0]
    assert result.validation["bits_per_byte"] == pytest.approx(val[-1])
    assert result.tokens_seen == 30 * 4 * 64


def test_resume_matches_uninterrupted(docs: tuple[list, list], tmp_path: Path) -> None:
    config = _config(steps=12, checkpoint_every=4, keep_checkpoints=2)
    quiet = lambda _: None  # noqa: E731
    full = train(TINY, config, *docs, ByteTokenizer(), workdir=tmp_path / "a", log=quiet)
    part = train(TINY, config, *docs, ByteTokenizer(), workdir=tmp_path / "b", stop_at_step=6, log=quiet)
    assert part.step == 6 and part.validation is None
    resumed = train(TINY, config, *docs, ByteTokenizer(), workdir=tmp_path / "b", log=quiet)
    assert resumed.step == 12
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.validation == full.validation
    kept = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [8, 12]  # keep_checkpoints=2


def test_export_round_trip(trained) -> None:  # noqa: ANN001
    result, _, out = trained
    record = json.loads((out / "training.json").read_text())
    for key in ("command", "tokens_seen", "final_train_loss", "validation", "machine", "wall_time_s",
                "train", "model"):
        assert key in record
    assert record["validation"]["bits_per_byte"] > 0
    assert (out / "TRAINING.md").read_text().startswith("# model")
    graphdef = nnx.split(nnx.eval_shape(lambda: LlamaModel(TINY, rngs=nnx.Rngs(0))))[0]
    trained_model = nnx.merge(graphdef, result.params)
    tokens = jnp.asarray(np.arange(48, dtype=np.int32).reshape(2, 24) * 5 % 256)
    want, _ = forward(trained_model, tokens)
    loaded = from_pretrained(out)
    assert loaded.dtype == jnp.bfloat16
    got_bf16, _ = forward(loaded, tokens)
    np.testing.assert_allclose(got_bf16, want, atol=BF16_LOGITS_ATOL * 4, rtol=BF16_LOGITS_RTOL * 4)
    got, _ = forward(from_pretrained(out, dtype="float32"), tokens)
    np.testing.assert_allclose(got, want, atol=BF16_LOGITS_ATOL, rtol=BF16_LOGITS_RTOL)
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), result.params)
    exact, _ = forward(nnx.merge(graphdef, rounded), tokens)
    np.testing.assert_allclose(got, exact, atol=1e-5, rtol=1e-5)


def test_eval_padding_rows_do_not_count(docs: tuple[list, list]) -> None:
    _, val_docs = docs
    tok = ByteTokenizer()
    full = validation_set(val_docs, tok, seq_len=64)
    assert full.num_bytes == sum(len(d.text.encode()) for d in val_docs)
    subset = validation_set(val_docs, tok, seq_len=64, max_windows=5)
    assert len(subset.windows.tokens) == 5 and 0 < subset.num_bytes < full.num_bytes
    config = _config()
    fns = make_train_fns(TINY, make_optimizer(config), "float32")
    params = nnx.split(LlamaModel(TINY, rngs=nnx.Rngs(1)))[1]
    one = evaluate(fns.eval_sums, params, subset, batch_size=1)
    padded = evaluate(fns.eval_sums, params, subset, batch_size=3)  # 5 windows: one padding row
    assert one["tokens"] == padded["tokens"] == subset.num_tokens
    assert padded["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-5)
    assert one["loss"] == pytest.approx(math.log(259), abs=0.2)  # untrained: near uniform


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(peak_lr=-1e-3), "peak_lr"),
        (dict(warmup_steps=50, steps=10), "warmup_steps"),
        (dict(seq_len=0), "seq_len"),
        (dict(batch_size=-2), "batch_size"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(compute_dtype="float16"), "compute_dtype"),
        (dict(grad_clip_norm=float("nan")), "grad_clip_norm"),
    ],
)
def test_bad_config_raises_naming_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _config(**overrides)


def test_train_rejects_seq_len_beyond_context(docs: tuple[list, list], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        train(TINY, _config(seq_len=256), *docs, ByteTokenizer(), workdir=tmp_path)


def test_script_end_to_end(corpus_dir: Path, tmp_path: Path) -> None:
    """`python -m experiments.train` on a tiny override: stop at step 3, then resume to 6 and export."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = [
        sys.executable, "-m", "experiments.train", "--config", "configs/train_draft.py",
        "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.model.num_layers=2", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.head_dim=16", "--config.train.batch_size=2", "--config.train.seq_len=32",
        "--config.train.steps=6", "--config.train.warmup_steps=2", "--config.train.eval_every=3",
        "--config.train.eval_max_windows=4", "--config.train.log_every=2",
        "--config.train.compute_dtype=bfloat16", f"--config.data.source={corpus_dir}",
        f"--workdir={work}", f"--output_dir={out}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.run([*args, "--stop_at_step=3"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not out.exists()
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    record = json.loads((out / "training.json").read_text())
    assert record["step"] == 6 and record["tokens_seen"] == 6 * 2 * 32
    assert record["command"].startswith("python -m experiments.train --config configs/train_draft.py")
    assert math.isfinite(record["final_train_loss"])
    assert record["train"]["compute_dtype"] == "bfloat16"
    assert from_pretrained(out).config.hidden_size == 32


def test_microbatches_match_full_batch() -> None:
    """Gradient accumulation over 2 chunks gives the same update as the whole batch."""
    config = _config(batch_size=4, microbatches=2)
    optimizer = make_optimizer(config)
    windows = np.random.default_rng(0).integers(0, 256, (4, 33), dtype=np.int32)
    out = []
    for m in (1, 2):
        params = nnx.split(LlamaModel(TINY, rngs=nnx.Rngs(0)))[1]
        fns = make_train_fns(TINY, optimizer, "float32", microbatches=m)
        params, _, metrics = fns.step(params, optimizer.init(params), windows)
        out.append((params, float(metrics["loss"])))
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_microbatches_must_divide_batch() -> None:
    with pytest.raises(ValueError, match="microbatches"):
        _config(batch_size=4, microbatches=3)
