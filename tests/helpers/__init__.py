"""Shared test helpers (importable as `helpers.*` via pytest's pythonpath)."""
