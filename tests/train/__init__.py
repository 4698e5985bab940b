"""The exact training paths: extended-precision checks of the no-branch-storage kernels."""
