"""pytest suite for mobileone_rs; `tests.oracle` is the seed's math in plain PyTorch."""
