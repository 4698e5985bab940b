"""Self-checks of the oracle (the seed's math in plain PyTorch)."""
