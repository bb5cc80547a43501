"""Pallas kernels (Mosaic TPU, Mosaic GPU), each beside its plain-jnp reference.

This package imports jax only, never `efficient`.
"""
