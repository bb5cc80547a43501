import time, numpy as np, jax, jax.numpy as jnp
from efficient.models import from_pretrained, jit_forward, set_layer_loop, resolve_model_path
from efficient.cache import DenseKVCache
p = resolve_model_path("smollm2")
models = {"scan": from_pretrained(p, dtype="float32"), "unrolled": set_layer_loop(from_pretrained(p, dtype="float32"), "unrolled")}
for batch in (1, 8):
    steps = {k: jit_forward(m, check_values=False) for k, m in models.items()}
    caches = {}
    for k, m in models.items():
        c = DenseKVCache.for_model(m.config, batch, 512)
        _, c = steps[k](jnp.ones((batch, 256), jnp.int32), cache=c); caches[k] = c
    one = jnp.ones((batch, 1), jnp.int32)
    times = {k: [] for k in models}
    for r in range(7):
        for k in models:
            c = caches[k]
            t = time.perf_counter()
            for _ in range(16):
                logits, c = steps[k](one, cache=c)
            jax.block_until_ready(logits)
            if r: times[k].append((time.perf_counter() - t) / 16)
            caches[k] = c.truncate(jnp.full((batch,), 256, jnp.int32))  # back to the prompt: lengths stay bounded
    print(batch, {k: round(1e3 * float(np.median(v)), 1) for k, v in times.items()}, flush=True)
