"""Exact by construction: every fast path equals the reference's module path, over states and tools."""
