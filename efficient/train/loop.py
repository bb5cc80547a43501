"""The training loop: AdamW on next-token loss, periodic eval and checkpoints, export.

    result = train(model_config, train_config, train_docs, val_docs, tokenizer,
                   workdir="workdirs/target", output_dir="checkpoints/target")

A run resumes from the latest checkpoint in `workdir` when there is one: the
parameters, optimizer state and step are restored and the batch stream (a
function of `data_seed`) is replayed to the batch where the run stopped, so an
interrupted run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from efficient.data import Document, Tokenizer, check_vocab, iter_batches
from efficient.models import LlamaModel, ModelConfig
from efficient.train.checkpoint import Checkpointer
from efficient.train.config import TrainConfig
from efficient.train.export import export_model, machine_info, write_record
from efficient.train.optimizer import lr_schedule, make_optimizer
from efficient.train.step import make_train_fns
from efficient.train.validation import evaluate, validation_set

Logger = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a (possibly partial) run ended with."""

    params: Any  # float32 nnx.State
    step: int
    tokens_seen: int
    final_train_loss: float  # mean over the last log interval (nats/token)
    validation: dict[str, float] | None  # of the final eval, when the run reached `steps`
    wall_time_s: float  # summed over resumed segments
    record: dict[str, Any]


def _batches(docs: Sequence[Document | str], tokenizer: Tokenizer, config: TrainConfig,
             skip: int) -> Iterator[np.ndarray]:
    """The run's batch stream, advanced past the `skip` batches already drawn."""
    stream = iter_batches(docs, tokenizer, config.batch_size, config.seq_len, config.data_seed)
    for _ in range(skip):
        next(stream)
    return stream


def _check_resume(meta: dict[str, Any], config: TrainConfig, model_config: ModelConfig) -> None:
    saved = meta.get("train", {})
    for name in ("batch_size", "seq_len", "data_seed", "steps", "peak_lr", "warmup_steps"):
        if name in saved and saved[name] != getattr(config, name):
            raise ValueError(
                f"train.{name}={getattr(config, name)!r} differs from the checkpoint's "
                f"{saved[name]!r}; use a fresh workdir or the checkpoint's value"
            )
    if meta.get("model") and meta["model"] != _model_dict(model_config):
        raise ValueError("model config differs from the checkpoint's; use a fresh workdir")


@functools.lru_cache(maxsize=4)
def _compiled(model_config: ModelConfig, config: TrainConfig, sharding: Any = None) -> tuple[Any, Any, Any]:
    """(optimizer, train fns, jitted init) of a run; cached so repeated runs in one process reuse
    the compiled programs."""
    optimizer = make_optimizer(config)
    fns = make_train_fns(model_config, optimizer, config.compute_dtype, config.microbatches, sharding=sharding)

    def init() -> tuple[Any, Any]:
        params = nnx.split(LlamaModel(model_config, rngs=nnx.Rngs(config.seed)))[1]
        return params, optimizer.init(params)

    return optimizer, fns, jax.jit(init)


def _warm_start(folder: str | Path, model_config: ModelConfig, init: Callable[[], Any],
                optimizer: Any) -> tuple[Any, Any]:
    """Parameters of an HF folder (float32) and a fresh optimizer state for them."""
    from efficient.models import from_pretrained  # noqa: PLC0415 (loading pulls safetensors)

    loaded = from_pretrained(folder, dtype="float32")
    if _model_dict(loaded.config.replace(attention_implementation=None)) != _model_dict(model_config):
        raise ValueError(f"init_from: {str(folder)!r} holds another architecture than the configured model")
    params_like, _ = jax.eval_shape(init)
    params = jax.tree_util.tree_map(lambda like, x: x.astype(like.dtype), params_like, nnx.split(loaded)[1])
    return params, optimizer.init(params)


def _place_state(params: Any, opt_state: Any, optimizer: Any, model_config: ModelConfig, sharding: Any
                 ) -> tuple[Any, Any]:
    """Parameters moved to their shards and the optimizer state to the shards its fresh
    init takes for them (its moments follow the parameters)."""
    from efficient.parallel.params import place_params  # noqa: PLC0415 (parallel imports models)

    params = place_params(params, model_config, sharding)
    fresh = jax.jit(optimizer.init)(params)

    def target(like: jax.Array) -> jax.sharding.Sharding:  # scalars (the step count): replicated
        spread = isinstance(like.sharding, jax.sharding.NamedSharding) and like.sharding.mesh == sharding.mesh
        return like.sharding if spread else sharding.replicated()

    return params, jax.tree.map(lambda x, like: jax.device_put(x, target(like)), opt_state, fresh)


def _prior_tokens(folder: str | Path | None) -> int:
    """Tokens recorded in `folder`/training.json (0 without one)."""
    if folder is None or not (Path(folder) / "training.json").is_file():
        return 0
    record = json.loads((Path(folder) / "training.json").read_text())
    return int(record.get("tokens_seen_total", record.get("tokens_seen", 0)))


def _model_dict(config: ModelConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config.replace(dtype="float32"))))


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    train_docs: Sequence[Document | str],
    val_docs: Sequence[Document | str],
    tokenizer: Tokenizer,
    *,
    workdir: str | Path,
    output_dir: str | Path | None = None,
    stop_at_step: int | None = None,
    name: str = "model",
    command: str = "",
    extra_record: dict[str, Any] | None = None,
    init_from: str | Path | None = None,
    sharding: Any = None,
    log: Logger = _stderr,
) -> TrainResult:
    """Trains (or resumes) to `config.steps`, or stops early at `stop_at_step`.

    init_from: an HF checkpoint folder whose weights start a fresh run (a warm
    restart: new optimizer state and schedule); ignored when `workdir` holds a
    checkpoint to resume. Its recorded tokens are added to `tokens_seen_total`.
    sharding: an `efficient.parallel.ModelSharding` (or a mesh): data parallel over the
    rules' batch axis, parameters and optimizer state split by the rules (FSDP_RULES: also
    over "data"); checkpoints are saved from and resumed into the shards.

    Checkpoints go to `workdir`; when the run reaches `config.steps` and
    `output_dir` is given, the bf16 HF folder and TRAINING.md/training.json go there.
    """
    check_vocab(tokenizer, model_config.vocab_size)
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's "
                         f"max_position_embeddings={model_config.max_position_embeddings}")
    stop = config.steps if stop_at_step is None else stop_at_step
    if not 0 <= stop <= config.steps:
        raise ValueError(f"stop_at_step must be in [0, steps={config.steps}], got {stop_at_step}")
    model_config = model_config.replace(dtype="float32")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    if sharding is not None:
        from efficient.parallel.params import as_sharding  # noqa: PLC0415 (parallel imports models)

        sharding = as_sharding(sharding)
    optimizer, fns, init = _compiled(model_config, config, sharding)
    schedule = lr_schedule(config)
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)

    step, wall_before = 0, 0.0
    if ckpt.latest_step() is not None:
        params_like, opt_state_like = jax.eval_shape(init)
        restored = ckpt.restore(params_like, opt_state_like)
        _check_resume(restored.meta, config, model_config)
        params, opt_state, step = restored.params, restored.opt_state, restored.step
        wall_before = float(restored.meta.get("wall_time_s", 0.0))
        log(f"resumed from {ckpt.directory}/{step} (batches drawn: {restored.meta['batches_drawn']})")
    elif init_from is not None:
        params, opt_state = _warm_start(init_from, model_config, init, optimizer)
        log(f"warm start from {init_from}")
    else:
        params, opt_state = init()
    if sharding is not None:
        params, opt_state = _place_state(params, opt_state, optimizer, model_config, sharding)

    val = validation_set(val_docs, tokenizer, config.seq_len, config.eval_max_windows)
    batches = _batches(train_docs, tokenizer, config, skip=step)
    base_meta = {"train": config.to_dict(), "model": _model_dict(model_config),
                 "data_seed": config.data_seed, "name": name}
    metrics_file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115

    def emit(record: dict[str, Any]) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def save(at: int) -> None:
        meta = {**base_meta, "batches_drawn": at, "wall_time_s": wall_before + time.time() - t0}
        ckpt.save(at, params, opt_state, meta)

    log(f"{name}: {model_config.num_parameters():,} params, steps {step}->{stop}/{config.steps}, "
        f"{config.batch_size}x{config.seq_len} tokens/step, compute {config.compute_dtype}, "
        f"{len(val.windows.tokens)} validation windows")
    t0 = time.time()
    recent: collections.deque[jax.Array] = collections.deque(maxlen=max(config.log_every, 1))
    interval_start, interval_step = time.time(), step
    last_saved = step
    validation: dict[str, float] | None = None
    try:
        while step < stop:
            params, opt_state, metrics = fns.step(params, opt_state, next(batches))
            step += 1
            recent.append(metrics["loss"])
            if config.log_every and (step % config.log_every == 0 or step == stop):
                loss = float(np.mean(jax.device_get(list(recent))))
                now = time.time()
                rate = (step - interval_step) * config.tokens_per_step / max(now - interval_start, 1e-9)
                eta = (stop - step) * config.tokens_per_step / rate
                lr = float(np.asarray(schedule(np.int32(step - 1))))
                log(f"step {step}/{config.steps} loss {loss:.4f} lr {lr:.2e} "
                    f"grad_norm {float(metrics['grad_norm']):.3f} tok/s {rate:,.0f} ETA {eta / 60:.1f} min")
                emit({"step": step, "loss": loss, "lr": lr, "tokens_per_s": rate,
                      "grad_norm": float(metrics["grad_norm"])})
                interval_start, interval_step = time.time(), step
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                ev = evaluate(fns.eval_sums, params, val, config.eval_batch_size)
                log(f"step {step} validation loss {ev['loss']:.4f} bits/byte {ev['bits_per_byte']:.4f}")
                emit({"step": step, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
                interval_start = time.time()
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < stop:
                save(step)
                last_saved = step
                interval_start = time.time()
    except KeyboardInterrupt:
        log(f"interrupted at step {step}; saving a checkpoint")
        try:
            save(step)
        finally:
            metrics_file.close()
            ckpt.close()
        raise
    if step != last_saved or ckpt.latest_step() is None:
        save(step)
    final_loss = float(np.mean(jax.device_get(list(recent)))) if recent else float("nan")
    if step == config.steps:
        validation = evaluate(fns.eval_sums, params, val, config.eval_batch_size)
        log(f"final validation loss {validation['loss']:.4f} bits/byte {validation['bits_per_byte']:.4f}")
        emit({"step": step, "val_loss": validation["loss"],
              "val_bits_per_byte": validation["bits_per_byte"]})
    wall = wall_before + time.time() - t0
    metrics_file.close()
    ckpt.close()
    prior = _prior_tokens(init_from)
    record = {
        "name": name,
        "command": command,
        "step": step,
        "tokens_seen": step * config.tokens_per_step,
        "init_from": None if init_from is None else str(init_from),
        "tokens_seen_total": prior + step * config.tokens_per_step,
        "final_train_loss": final_loss,
        "validation": validation,
        "wall_time_s": wall,
        "num_parameters": model_config.num_parameters(),
        "export_dtype": "bfloat16",
        "model": _model_dict(model_config),
        "train": config.to_dict(),
        "machine": machine_info(),
        "workdir": str(workdir),
        **(extra_record or {}),
    }
    if output_dir is not None and step == config.steps:
        export_model(params, model_config, output_dir, dtype="bfloat16")
        write_record(output_dir, record)
        log(f"exported {output_dir}")
    return TrainResult(params, step, record["tokens_seen"], final_loss, validation, wall, record)
