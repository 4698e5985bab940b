#!/usr/bin/env bash
# Usage: tools/torch_matrix.sh TORCH...        (make matrix; MATRIX_DIR, default .matrix)
# The README's torch support matrix: for each torch minor of torch-versions.txt, a venv with that torch
# and everything the test suite needs (tools/torch_venv.sh), the wheel of the build serving it
# (tools/torch_build.sh, built with the build's own torch), installed into that venv, then the whole
# pytest suite and the cargo tests (the build's test binaries, on this torch's libtorch). One line per
# torch goes to $MATRIX_DIR/matrix.txt; logs beside it. Downloads several torches: not part of CI.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mkdir -p "${MATRIX_DIR:-$root/.matrix}" && cd "${MATRIX_DIR:-$root/.matrix}" && pwd)
table=$root/torch-versions.txt
venv() { [ -x "$dir/torch$1/bin/python" ] || "$root/tools/torch_venv.sh" "$1" "$dir/torch$1" dev >&2; }
summary() { grep -E '^[=]* *[0-9]+ (passed|failed)|^test result:|[0-9]+ passed' "$1" | tail -1 | tr -d '='; }

for torch in "$@"; do
  build=$(awk -v t="$torch" '$1 == t { print $2 }' "$table")
  [ -n "$build" ] || { echo "torch $torch is not in torch-versions.txt" >&2; exit 2; }
  log=$dir/torch$torch
  venv "$torch" > "$log.venv.log" 2>&1 && venv "$build" >> "$log.venv.log" 2>&1 \
    || { echo "$torch | venv failed ($log.venv.log)" | tee -a "$dir/matrix.txt"; continue; }
  wheels=$dir/wheels-$build
  if ! ls "$wheels"/*.whl > /dev/null 2>&1; then
    "$root/tools/torch_build.sh" "$build" "$dir/torch$build" "$wheels" > "$dir/build$build.log" 2>&1 \
      || { echo "$torch | build $build: fails ($dir/build$build.log)" | tee -a "$dir/matrix.txt"; continue; }
  fi
  py=$dir/torch$torch/bin/python
  "$py" -m pip install -q --no-deps --force-reinstall "$wheels"/*.whl > "$log.install.log" 2>&1
  version=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
  (cd "$root" && "$py" -m pytest tests -q -p no:cacheprovider) > "$log.pytest.log" 2>&1
  # The build's cargo test binaries (no Python), on this torch's libtorch.
  lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  bypass=$("$dir/torch$build/bin/python" -c 'import torch; print(int(torch.__version__.split("+")[0].split(".")[2] != "0"))')
  [ "$bypass" = 1 ] && export LIBTORCH_BYPASS_VERSION_CHECK=1 || unset LIBTORCH_BYPASS_VERSION_CHECK  # as torch_build.sh
  (cd "$root/target/torch-$build/src" && VIRTUAL_ENV=$dir/torch$build PATH=$dir/torch$build/bin:$PATH \
    CARGO_TARGET_DIR=$root/target/torch-$build/target LD_LIBRARY_PATH=$lib \
    cargo test --release --no-default-features -q) > "$log.cargo.log" 2>&1
  cargo=$(grep -E '^test result:' "$log.cargo.log" | awk '{p += $4; f += $6} END {print p " passed, " f " failed"}')
  echo "$torch | $version | build $build | pytest: $(summary "$log.pytest.log") | cargo: $cargo" \
    | tee -a "$dir/matrix.txt"
done
