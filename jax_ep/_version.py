"""The single source of jax_ep's version (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
