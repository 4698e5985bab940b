"""pytest suite for mobileone_rs; `tests.oracle` is the reference's math in plain PyTorch."""
