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
# # Quickstart: load a model, generate, compare two KV caches
#
# Loads the embedded default byte-level model (`checkpoints/target`, trained on the
# Python standard library), completes a held-out stdlib file, then compares the
# dense float32 cache with a bfloat16 one on quality (bits/byte, agreement),
# speed and memory.
#
# Any Hugging Face Llama/Mistral/Qwen checkpoint folder works: set `MODEL_PATH`.
# `EFFICIENT_NOTEBOOK_SMOKE=1` runs everything on tiny settings (and a tiny random
# model when `MODEL_PATH` is unset); the test suite runs it that way.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from flax import nnx

from efficient import variants
from efficient.data import ByteTokenizer, Corpus, check_vocab, eval_windows, load_tokenizer
from efficient.eval import cache_memory, measure_generation, perplexity, prefix_agreement, select_windows
from efficient.models import LlamaModel, ModelConfig, from_pretrained, save_pretrained

SMOKE = os.environ.get("EFFICIENT_NOTEBOOK_SMOKE") == "1"
ROOT = Path.cwd() if (Path.cwd() / "efficient").is_dir() else Path.cwd().parent  # repo root or notebooks/
MODEL_PATH = os.environ.get("MODEL_PATH", "")
PROMPT_TOKENS, NEW_TOKENS, SEQ_LEN, WINDOWS = (32, 8, 64, 2) if SMOKE else (256, 64, 512, 8)

if not MODEL_PATH and SMOKE:  # a tiny random byte-level model, saved like a real checkpoint
    tok = ByteTokenizer()
    tiny = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(tok.eos_id,),
                       pad_token_id=tok.pad_id, max_position_embeddings=512)
    MODEL_PATH = tempfile.mkdtemp(prefix="tiny_model_")
    save_pretrained(LlamaModel(tiny, rngs=nnx.Rngs(0)), MODEL_PATH)
MODEL_PATH = Path(MODEL_PATH or ROOT / "checkpoints" / "target")
print("model:", MODEL_PATH)

# %% [markdown]
# ## Load the model and its tokenizer
# A folder with a `tokenizer.json` uses it; the embedded models are byte-level.

# %%
model = from_pretrained(MODEL_PATH, dtype="float32")  # FileNotFoundError naming the folder if absent
tokenizer = load_tokenizer(MODEL_PATH) if (MODEL_PATH / "tokenizer.json").exists() else ByteTokenizer()
check_vocab(tokenizer, model.config.vocab_size)
print(f"{model.config.num_parameters() / 1e6:.2f}M parameters, {model.config.num_layers} layers, {tokenizer!r}")

# %% [markdown]
# ## Complete held-out code
# The corpus is split by module; `test` modules were never trained on.

# %%
held_out = Corpus.from_stdlib().split("test")
document = max(held_out[:20], key=lambda d: len(d.text))
prompt = tokenizer.encode(document.text)[:PROMPT_TOKENS]
out = variants.get_decoder("greedy").fn(model, [prompt], max_new_tokens=NEW_TOKENS, cache=None, key=0,
                                        stop_tokens=model.config.eos_token_ids)
print(f"--- {document.path} (prompt) ---\n{tokenizer.decode(prompt)}")
print(f"--- greedy completion ({out.lengths[0]} tokens) ---\n{tokenizer.decode(out.sequences()[0])}")

# %% [markdown]
# ## Compare two caches
# Bits/byte is computed by prefilling held-out windows through each cache in chunks,
# so a lossy cache is measured on what it keeps. Agreement: the fraction of the dense
# cache's greedy tokens a cache reproduces before the first difference.

# %%
windows = select_windows(eval_windows(held_out, tokenizer, SEQ_LEN), tokenizer, WINDOWS)
prompts = [tokenizer.encode(d.text)[:PROMPT_TOKENS] for d in held_out[:4] if len(d.text) > 4 * PROMPT_TOKENS]
greedy = variants.get_decoder("greedy").fn
results = {}
for name in ("dense", "dense_bf16"):
    cache = variants.get_cache(name)
    quality = perplexity(model, windows, cache=cache.factory, chunk=SEQ_LEN // 4)
    speed = measure_generation(greedy, model, prompts, max_new_tokens=NEW_TOKENS, repeats=1 if SMOKE else 3,
                               cache=cache.factory, key=0, stop_tokens=())
    memory = cache_memory(cache.factory, model.config, len(prompts), 512)
    results[name] = dict(bits_per_byte=quality.bits_per_byte, tokens_per_s=speed.decode_tokens_per_second,
                         ttft_ms=1e3 * speed.time_to_first_token, mib=memory.mebibytes,
                         sequences=speed.output.sequences())
for name, r in results.items():
    r["agreement"] = prefix_agreement(results["dense"]["sequences"], r["sequences"])
    print(f"{name:>10}: {r['bits_per_byte']:.4f} bits/byte, agreement {r['agreement']:.2f}, "
          f"{r['tokens_per_s']:.0f} tok/s, ttft {r['ttft_ms']:.1f} ms, {r['mib']:.2f} MiB at 512 slots")

# %%
panels = [("bits_per_byte", "bits/byte"), ("agreement", "agreement with dense"),
          ("tokens_per_s", "decode tokens/s"), ("mib", "cache MiB (512 slots)")]
fig, axes = plt.subplots(1, len(panels), figsize=(12, 3))
for ax, (key, title) in zip(axes, panels):
    ax.bar(list(results), [r[key] for r in results.values()], color=["tab:blue", "tab:orange"])
    ax.set_title(title)
fig.tight_layout()
plt.show()

# %% [markdown]
# Every registered decoder and cache, with retrieval accuracy too, in one command:
#
#     python -m experiments.run --config configs/quickstart.py
