"""The documentation's code, run as written: README.md's Python blocks and docs/yolov9.md's journey."""
