"""The command lines: one-line errors with exit status 2, complete help."""
