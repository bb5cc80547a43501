"""efficient: a JAX research library for efficient transformer inference."""

__version__ = "0.1.0"
