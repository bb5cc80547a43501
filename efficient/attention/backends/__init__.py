"""Kernel-backed attention implementations; importing this package registers them.

"pallas_tpu" (flash + split-K decode Pallas Mosaic TPU kernels) and "cudnn"
(jax.nn.dot_product_attention's cuDNN path). "xla" stays as registered by the
dispatcher. What each serves is declared in `efficient.attention.capabilities`;
the dispatcher consults that table before calling an adapter.
"""

from efficient.attention.backends import cudnn, pallas_tpu

__all__ = ["cudnn", "pallas_tpu"]
