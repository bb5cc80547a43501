"""The end of a run: an HF folder (bf16 safetensors) plus TRAINING.md / training.json."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from efficient.models import LlamaModel, ModelConfig, save_pretrained


def machine_info() -> dict[str, Any]:
    """Platform, CPU count (and those this process may use), JAX backend and devices."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "jax_version": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
    }


def export_model(params: Any, model_config: ModelConfig, folder: str | Path,
                 dtype: str = "bfloat16") -> Path:
    """Writes float32 `params` of `model_config` as an HF folder in `dtype`."""
    config32 = model_config.replace(dtype="float32")
    graphdef = nnx.split(nnx.eval_shape(lambda: LlamaModel(config32, rngs=nnx.Rngs(0))))[0]
    model = nnx.merge(graphdef, params)
    folder = Path(folder)
    save_pretrained(model, folder, dtype=dtype)
    return folder


def write_record(folder: str | Path, record: dict[str, Any]) -> None:
    """training.json (the record as is) and TRAINING.md (a human summary of it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "training.json", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
    (folder / "TRAINING.md").write_text(_markdown(record))


def _markdown(r: dict[str, Any]) -> str:
    val = r.get("validation") or {}
    lines = [
        f"# {r.get('name', 'model')}",
        "",
        "Trained with `efficient.train` (byte-level next-token prediction).",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{r.get('command', '')}` |",
        f"| parameters | {r.get('num_parameters', '?'):,} |",
        f"| steps | {r.get('step')} / {r.get('train', {}).get('steps')} |",
        f"| tokens seen | {r.get('tokens_seen', 0):,} |",
        *([f"| warm start from | `{r['init_from']}` (tokens seen in all: {r.get('tokens_seen_total', 0):,}) |"]
          if r.get("init_from") else []),
        f"| final train loss (nats/token) | {r.get('final_train_loss', float('nan')):.4f} |",
        f"| validation loss (nats/token) | {val.get('loss', float('nan')):.4f} |",
        f"| validation bits/byte | {val.get('bits_per_byte', float('nan')):.4f} "
        f"({val.get('bytes', 0):,} bytes) |",
        f"| wall time | {r.get('wall_time_s', 0.0) / 60:.1f} min |",
        f"| exported dtype | {r.get('export_dtype', '')} |",
        "",
        "## Machine",
        "",
        "```json",
        json.dumps(r.get("machine", {}), indent=2),
        "```",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps({"model": r.get("model"), "train": r.get("train"), "data": r.get("data")},
                   indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)
