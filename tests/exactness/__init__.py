"""Exact by construction: every fast path equals the seed's module path, over states and tools."""
