"""Prefill and decode speed of our jitted stack against transformers (PyTorch) on one CPU.

For each dtype and (batch, prompt length) cell, both sides run the same prompts
(held-out stdlib text), interleaved, `repeats` times after a warm-up that compiles
(ours) or warms the allocator (torch); medians are reported with their ratio
(ours / transformers, > 1 = we are faster). Prefill: the whole prompt through the
model into an empty cache (ours: `generate`'s jitted prefill, time to first token).
Decode: `new_tokens` greedy tokens after the prompt, prefill excluded (ours: the
jitted `lax.while_loop`; transformers: a greedy loop over `past_key_values`).

torch runs with `threads` threads and OMP_WAIT_POLICY=PASSIVE (set before torch is
imported): with OpenMP's default spin-waiting it ran about 10x slower on this shared
2-core machine. Peak RSS is reported per side from a separate subprocess each.
Writes <out_dir>/<run>/{config.json, metrics.json} and prints a table.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from efficient.data import Corpus  # noqa: E402
from efficient.decoding import generate  # noqa: E402
from efficient.models import from_pretrained, resolve_model_path, set_layer_loop  # noqa: E402
from experiments.common import load_tokenizer_for, machine_info, write_run  # noqa: E402


def prompt_batch(tokenizer: Any, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[batch, length] token ids of held-out stdlib text (each row a different window)."""
    text = "\n".join(doc.text for doc in Corpus.from_stdlib().split("test"))
    ids = np.asarray(tokenizer.encode(text[: 40 * length * batch + 10_000]), np.int64)
    if ids.size < batch * length:
        raise ValueError(f"prefill/decode: the test split holds {ids.size} tokens, {batch * length} needed")
    starts = np.random.default_rng(seed).choice(ids.size - length, size=batch, replace=False)
    return np.stack([ids[s:s + length] for s in starts])


class Ours:
    """Our `generate`; `layer_loop` as `efficient.models.set_layer_loop` (a side named
    "efficient", or "efficient_<layer_loop>" for a second one of ours)."""

    def __init__(self, path: Path, dtype: str, layer_loop: str = "auto", name: str = "efficient") -> None:
        self.name = name
        self.model = set_layer_loop(from_pretrained(path, dtype=dtype), layer_loop)

    def prefill(self, prompts: np.ndarray) -> float:
        out = generate(self.model, prompts, max_new_tokens=1, stop_tokens=())
        return out.stats.prefill_seconds

    def decode(self, prompts: np.ndarray, new_tokens: int) -> float:
        """Seconds of the decode loop alone (prefill excluded)."""
        out = generate(self.model, prompts, max_new_tokens=new_tokens, stop_tokens=())
        return out.stats.decode_seconds


class Transformers:
    name = "transformers"

    def __init__(self, path: Path, dtype: str, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        kwargs: dict[str, Any] = dict(dtype=getattr(torch, dtype))
        if path.is_file():
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        self.model.eval()

    def prefill(self, prompts: np.ndarray) -> float:
        ids = self.torch.as_tensor(prompts)
        with self.torch.inference_mode():
            start = time.perf_counter()
            logits = self.model(ids, use_cache=True, logits_to_keep=1).logits
            logits.argmax(-1)
            return time.perf_counter() - start

    def decode(self, prompts: np.ndarray, new_tokens: int) -> float:
        ids = self.torch.as_tensor(prompts)
        with self.torch.inference_mode():
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return float(np.median(values))


def measure(config: Any) -> dict[str, Any]:
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer_for(config.model, "auto", 10**9)
    cells = []
    for dtype in config.dtypes:
        sides = [Ours(path, dtype, config.layer_loop)]
        if config.also_layer_loop:  # a second of ours, side by side (e.g. scan against unrolled)
            sides.append(Ours(path, dtype, config.also_layer_loop, f"efficient_{config.also_layer_loop}"))
        if config.peer == "transformers":
            sides.append(Transformers(path, dtype, config.threads))
        for kind, grid in (("prefill", config.prefill), ("decode", config.decode)):
            for batch, length in grid:
                prompts = prompt_batch(tokenizer, int(batch), int(length))
                times: dict[str, list[float]] = {side.name: [] for side in sides}

                def once(side: Any) -> float:
                    if kind == "prefill":
                        return side.prefill(prompts)
                    return side.decode(prompts, config.new_tokens)

                for side in sides:  # warm-up: compiles ours, warms torch's allocator
                    once(side)
                for _ in range(config.repeats):
                    for side in sides:
                        times[side.name].append(once(side))
                tokens = batch * (length if kind == "prefill" else config.new_tokens - 1)
                cell = dict(kind=kind, dtype=dtype, batch=int(batch), prompt_tokens=int(length))
                for name, values in times.items():
                    cell[f"{name}_seconds"] = _median(values)
                    cell[f"{name}_tokens_per_s"] = tokens / _median(values)
                if "transformers" in times:
                    cell["speedup"] = cell["transformers_seconds"] / cell["efficient_seconds"]
                cells.append(cell)
                print(_row(cell), flush=True)
    return dict(cells=cells, peak_rss_mib=peak_rss(config, path) if config.measure_rss else None)


def _row(cell: dict[str, Any]) -> str:
    peer = cell.get("transformers_tokens_per_s")
    others = "".join(f"  {key[:-len('_tokens_per_s')]} {value:9.1f} tok/s" for key, value in cell.items()
                     if key.startswith("efficient_") and key.endswith("_tokens_per_s")
                     and key != "efficient_tokens_per_s")
    return (f"{cell['kind']:>7} {cell['dtype']:>8} B={cell['batch']:<2} T={cell['prompt_tokens']:<5} "
            f"ours {cell['efficient_tokens_per_s']:9.1f} tok/s" + others
            + (f"  transformers {peer:9.1f} tok/s  ratio {cell['speedup']:.2f}x" if peer else ""))


def peak_rss(config: Any, path: Path) -> dict[str, float]:
    """Peak RSS (MiB) of each side loading the model and running the largest decode cell once."""
    batch, length = max(config.decode, key=lambda c: c[0] * c[1])
    out = {}
    for side in ("efficient", "transformers") if config.peer == "transformers" else ("efficient",):
        code = (
            "import sys, resource; sys.argv=['x'];"
            "from experiments.bench_peer import *;"
            f"p = resolve_model_path({config.model!r});"
            f"s = Ours(p, 'float32') if {side!r} == 'efficient' else Transformers(p, 'float32', {config.threads});"
            # random ids, not the tokenized corpus: loading the stdlib text and the tokenizer
            # peaked above both sides' model memory and hid the difference
            f"s.decode(np.random.default_rng(0).integers(3, 1000, ({batch}, {length})), 8);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        if done.returncode != 0:
            raise RuntimeError(f"peak RSS run of {side} failed: {done.stderr[-2000:]}")
        out[side] = int(done.stdout.split()[-1]) / 1024
    return out


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    start = time.perf_counter()
    metrics = measure(config)
    metrics.update(machine=machine_info(), seconds=time.perf_counter() - start,
                   self_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = write_run(config, metrics)
    print(f"peak RSS MiB: {metrics['peak_rss_mib']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_peer.py")
    app.run(main)
