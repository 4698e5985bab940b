"""The repository's structural rules (tools/check_layout.py) and the native module's stub."""
