"""Self-checks of the oracle (the reference's math in plain PyTorch)."""
