"""Packaging: which torch the package accepts, and what it says about the others."""
