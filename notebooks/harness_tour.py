# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the experiment harness
#
# 1. the registry of decoders and caches (`efficient/variants.py`), and adding one;
# 2. the metrics (`efficient.eval`): bits/byte through a cache, retrieval, memory, speed;
# 3. running an experiment (`experiments.run`) and reading its results folder;
# 4. the errors bad input gets.
#
# `MODEL_PATH` picks the checkpoint (default `checkpoints/target`);
# `EFFICIENT_NOTEBOOK_SMOKE=1` uses tiny settings (and a tiny random model if
# `MODEL_PATH` is unset), as the test suite does.

# %%
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = Path.cwd() if (Path.cwd() / "experiments").is_dir() else Path.cwd().parent
sys.path.insert(0, str(ROOT))  # experiments/ and configs/ live next to the library, not in it

from configs import quickstart as quickstart_config  # noqa: E402
from efficient import variants  # noqa: E402
from efficient.cache import DenseKVCache  # noqa: E402
from efficient.data import Corpus, eval_windows, passkey_example  # noqa: E402
from efficient.eval import cache_memory, perplexity, retrieval_accuracy, select_windows  # noqa: E402
from experiments.common import load_model, load_tokenizer_for, save_random_model  # noqa: E402
from experiments.run import run_experiment  # noqa: E402

SMOKE = os.environ.get("EFFICIENT_NOTEBOOK_SMOKE") == "1"
RESULTS = Path(os.environ.get("RESULTS_DIR") or (tempfile.mkdtemp(prefix="results_") if SMOKE else ROOT / "results"))
MODEL_PATH = os.environ.get("MODEL_PATH") or ""
if not MODEL_PATH and SMOKE:
    MODEL_PATH = str(save_random_model(Path(tempfile.mkdtemp()) / "tiny", size="tiny"))
MODEL_PATH = MODEL_PATH or str(ROOT / "checkpoints" / "target")

# %% [markdown]
# ## 1. The registry
# Every cache is a factory `(config, batch, capacity) -> KVCache`; every decoder is
# `fn(model, prompts, *, max_new_tokens, cache, key, stop_tokens, **options) -> GenerateOutput`.

# %%
for c in variants.caches():
    print(f"cache   {c.name:<12} lossless={c.lossless!s:<5} {c.description}")
for d in variants.decoders():
    print(f"decoder {d.name:<12} lossless={d.lossless!s:<5} {d.description}" + (f" needs {d.needs}" if d.needs else ""))

# %% [markdown]
# Adding a variant is one call. Here a float16 dense cache, registered for this session
# only (a library variant puts the same call at the end of `efficient/variants.py`):

# %%
variants.register_cache("dense_fp16", functools.partial(DenseKVCache.for_model, dtype="float16"),
                        lossless=False, description="Dense KV buffer in float16 (notebook demo)", replace=True)
print([c.name for c in variants.caches()])

# %% [markdown]
# ## 2. Metrics
# `perplexity` prefills held-out windows through any cache, `chunk` tokens at a time, and
# scores every chunk's logits; `cache=None` is the cacheless reference.

# %%
model = load_model(MODEL_PATH, dtype="float32")
tokenizer = load_tokenizer_for(MODEL_PATH, "auto", model.config.vocab_size)
held_out = Corpus.from_stdlib().split("test")
windows = select_windows(eval_windows(held_out, tokenizer, 64 if SMOKE else 512), tokenizer, 2 if SMOKE else 8)
reference = perplexity(model, windows)
print(f"cacheless: {reference.bits_per_byte:.4f} bits/byte over {reference.tokens} tokens ({reference.bytes} bytes)")
# Every registered cache (smoke: three, one of them the cache added above; the registry tests run all).
for c in variants.caches("dense,dense_fp16,kivi4" if SMOKE else None):
    q = perplexity(model, windows, cache=c.factory, chunk=16 if SMOKE else 128)
    m = cache_memory(c.factory, model.config, batch=1, capacity=2048)
    print(f"{c.name:>12}: {q.bits_per_byte:.4f} bits/byte, {m.bytes_per_token:.0f} bytes/token")

# %% [markdown]
# Retrieval: a passkey hidden in held-out code; the decoder must write it back.

# %%
example = passkey_example(tokenizer, 128 if SMOKE else 1024, depth=0.5, seed=0, documents=held_out,
                          capacity=model.config.max_position_embeddings)
print("...", example.prompt[-160:])
result = retrieval_accuracy(model, tokenizer, [example], cache=variants.get_cache("dense").factory)
print(f"answer {example.answer!r}, model wrote {result.records[0].output!r}, exact match {result.exact_match}")

# %% [markdown]
# ## 3. Running an experiment
# The command line `python -m experiments.run --config configs/quickstart.py --config.x=y` builds
# the same config and calls `run_experiment`. The new `dense_fp16` cache appears in the
# comparison without any change to the harness.

# %%
config = quickstart_config.get_config("tiny" if SMOKE else "default")
config.model.path = MODEL_PATH
config.results_dir = str(RESULTS)
if SMOKE:
    config.variants.decoders, config.variants.caches = "greedy", "dense,dense_fp16"
config.lock()
run = run_experiment(config)
metrics = json.loads((run / "metrics.json").read_text())
print(sorted(p.name for p in run.iterdir()))
print({(r["decoder"], r["cache"]): round(r["bits_per_byte"], 4) for r in metrics["rows"]})

# %%
plt.figure(figsize=(12, 7))
plt.imshow(plt.imread(run / "quickstart.png"))
plt.axis("off")
plt.show()

# %% [markdown]
# ## 4. Bad input gets a clear error

# %%
try:
    config.generation.max_new_tokenz = 4  # a typo: configs are locked
except AttributeError as err:
    print("locked config:", str(err).splitlines()[0])
try:
    load_model(RESULTS / "no_such_model")
except FileNotFoundError as err:
    print("missing model:", err)
try:
    passkey_example(tokenizer, 10 * model.config.max_position_embeddings, 0.5, 0,
                    capacity=model.config.max_position_embeddings)
except ValueError as err:
    print("too long a task:", err)
try:
    load_tokenizer_for(MODEL_PATH, "byte", vocab_size=100)  # as if the checkpoint had only 100 embedding rows
except ValueError as err:
    print("vocabulary mismatch:", err)

# %%
variants.unregister("dense_fp16")  # leave the registry as the library defines it
