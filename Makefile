# mobileone-rs developer commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The torch a wheel or bundle is built for: a build row of torch-versions.txt. 2.13, the default build,
# is what Cargo.lock pins (tch 0.26) and what .venv has; `make wheel TORCH=2.11` builds for another.
TORCH ?= 2.13
WHEEL_VENV ?= .venv-wheel-$(TORCH)
BUNDLE ?= dist/gpu-bundle-torch$(TORCH)

.PHONY: help venv build test test-fast test-rust test-python demo bench lint lint-rust lint-python wheel gpu-bundle matrix

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements-dev.txt requirements-yolov9.txt tools/pip_install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	tools/pip_install.sh $(PY) --upgrade pip
	tools/pip_install.sh $(PY) -r requirements-dev.txt -r requirements-yolov9.txt
	tools/pip_install.sh $(PY) --no-deps yolo9==1.0.18
	touch $@

venv: $(VENV)/.installed ## create .venv: torch 2.13, maturin, test tools, YOLOv9 (yolo9) for its tests

# maturin develop pip-installs the package's dependencies each time: PIP_QUIET=1 hides the ~30
# "Requirement already satisfied" lines. It also rewrites the extension's rpath when patchelf is
# there; without it, its warning is harmless: `import mobileone_rs` imports torch, which loads libtorch.
build: SHELL := /bin/bash
build: venv ## build the extension into .venv (release)
	rm -f python/mobileone_rs/_native.cpython-*.so  # a per-CPython build would shadow the abi3 one
	set -o pipefail; PIP_QUIET=1 maturin develop --release -q 2>&1 \
	  | sed -e 's/^.*Failed to set rpath.*patchelf.*$$/note: no patchelf, rpath not rewritten (harmless: torch loads libtorch first)/'

test-rust: venv ## cargo tests of the core (no Python linked)
	cargo test --release --no-default-features -q

test-python: build ## pytest suite
	$(PY) -m pytest tests -q

test: test-rust test-python ## every test

# The core in about a minute: the Rust tests and the block, fusion, training and exactness areas.
FAST_TESTS := tests/block tests/fuse tests/train tests/exactness tests/files tests/layout
test-fast: build ## the core tests only (about a minute): cargo tests, block/fuse/train/exactness pytest
	cargo test --release --no-default-features -q
	$(PY) -m pytest $(FAST_TESTS) -q -x -m "not slow"

demo: build ## the main job: the user's yaml stages, trained, fused and checked
	$(PY) -m mobileone_rs.demo

bench: build ## side-by-side benchmark against the pure-PyTorch reference
	$(PY) bench/bench.py

lint: lint-rust lint-python ## every lint CI runs: rustfmt, clippy, ruff (check, format), mypy, stubtest, layout

lint-rust: venv ## rustfmt and clippy (-D warnings, both feature sets; undocumented unsafe is denied in src/lib.rs)
	cargo fmt --check
	cargo clippy --release -q -- -D warnings
	cargo clippy --release -q --no-default-features --tests -- -D warnings

lint-python: build ## ruff check and format --check (110 columns), mypy, the native stub (stubtest), layout rules
	$(PY) -m ruff check python tests bench tools
	$(PY) -m ruff format --check -q python tests bench tools
	$(PY) -m mypy python/mobileone_rs
	$(PY) -m mypy.stubtest mobileone_rs._native --allowlist tools/stubtest-allowlist.txt
	$(PY) tools/check_layout.py

$(WHEEL_VENV)/.installed: torch-versions.txt tools/torch_venv.sh
	tools/torch_venv.sh $(TORCH) $(WHEEL_VENV) wheel
	touch $@

# The wheel links the installed torch's libtorch, which is not copied into it (auditwheel would list
# torch's own libraries as "external" and suggest bundling them: those lines are filtered out). Its
# manylinux tag is the lowest one the extension's glibc/libstdc++ symbol versions allow.
wheel: SHELL := /bin/bash
wheel: $(WHEEL_VENV)/.installed ## abi3 wheel into dist/ for torch TORCH (default 2.13; TORCH=2.11 etc., torch-versions.txt)
	set -o pipefail; tools/torch_build.sh $(TORCH) $(WHEEL_VENV) dist --auditwheel warn 2>&1 \
	  | grep -v -e ' => ' -e 'External shared libraries' -e ' requires:$$' -e 'copying the above external libraries'
	@echo "dist/: $$(ls -t dist/*.whl | head -1) (libtorch comes from the installed torch at run time)"

gpu-bundle: $(WHEEL_VENV)/.installed ## offline GPU checks folder for torch TORCH: dist/gpu-bundle-torchTORCH/run_gpu_checks.sh
	tools/gpu_bundle.sh $(TORCH) $(WHEEL_VENV) $(BUNDLE)

matrix: ## the README's torch support matrix: every torch of torch-versions.txt, built and tested (downloads; not CI)
	tools/torch_matrix.sh $(or $(TORCHES),$$(awk '/^[0-9]/ { print $$1 }' torch-versions.txt))
