"""Kernel-backed attention implementations; importing this package registers them.

"pallas_tpu" (flash + split-K decode Pallas Mosaic TPU kernels) and "cudnn"
(jax.nn.dot_product_attention's cuDNN path). "xla" stays as registered by the
dispatcher. Each adapter raises NotImplementedError, with the reason, for a
case it cannot serve, and the dispatcher tries the next implementation.
"""

from efficient.attention.backends import cudnn, pallas_tpu

__all__ = ["cudnn", "pallas_tpu"]
