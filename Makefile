# mobileone-rs developer commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help venv build test test-rust test-python demo bench lint wheel

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements-dev.txt requirements-yolov9.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-yolov9.txt
	$(PY) -m pip install -q --no-deps yolo9==1.0.18
	touch $@

venv: $(VENV)/.installed ## create .venv: torch 2.13, maturin, test tools, YOLOv9 (yolo9) for its tests

build: venv ## build the extension into .venv (release)
	maturin develop --release -q

test-rust: venv ## cargo tests of the core (no Python linked)
	cargo test --release --no-default-features -q

test-python: build ## pytest suite
	$(PY) -m pytest tests -q

test: test-rust test-python ## every test

demo: build ## the main job: the seed's yaml stages, trained, fused and checked
	$(PY) -m mobileone_rs.demo

bench: build ## side-by-side benchmark against the pure-PyTorch reference
	$(PY) bench/bench.py

lint: build ## rustfmt, clippy, ruff, the layout rules, the native stub (stubtest)
	cargo fmt --check
	cargo clippy --release -q -- -D warnings
	cargo clippy --release -q --no-default-features --tests -- -D warnings
	$(PY) -m ruff check python tests bench tools
	$(PY) tools/check_layout.py
	$(PY) -m mypy.stubtest mobileone_rs._native --allowlist tools/stubtest-allowlist.txt

wheel: venv ## build a wheel into dist/
	maturin build --release -o dist
