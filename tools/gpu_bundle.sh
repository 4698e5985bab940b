#!/usr/bin/env bash
# Usage: tools/gpu_bundle.sh TORCH VENV BUNDLE
# Writes BUNDLE/, the offline GPU checks for torch TORCH: the package built for that torch (abi3 wheel,
# unpacked), the tests that run on CUDA (tests/device and what they import; the YOLOv9 detector test runs
# where the yolo9 package is installed and skips elsewhere), the benchmark, and
# run_gpu_checks.sh (from tools/gpu_bundle/), which needs only Python, that torch, pytest (timm and
# onnxruntime are not needed). At most 64 MiB.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
torch=$1 venv=$2 bundle=$3
wheels=$(mktemp -d)
"$root/tools/torch_build.sh" "$torch" "$venv" "$wheels"
rm -rf "$bundle" && mkdir -p "$bundle/pkg"
"$venv/bin/python" -m zipfile -e "$wheels"/*.whl "$bundle/pkg"
cp "$wheels"/*.whl "$bundle/"
rm -rf "$wheels"
cd "$root"
files=(tests/__init__.py tests/conftest.py tests/_util.py tests/oracle.py tests/block/__init__.py
       tests/block/grid.py tests/device tests/yolov9/__init__.py tests/yolov9/helpers.py bench
       torch-versions.txt)
git ls-files -co --exclude-standard -- "${files[@]}" | tar -T - -cf - | tar -xf - -C "$bundle"
cp tools/gpu_bundle/run_gpu_checks.sh tools/gpu_bundle/collect_results.py "$bundle/"
# The benchmark names the commit it measured: this checkout's, not that of whatever tree holds the bundle.
echo "$(git rev-parse --short HEAD)$([ -z "$(git status --porcelain)" ] || echo -dirty)" > "$bundle/REVISION"
size=$(du -sm "$bundle" | cut -f1)
echo "$bundle: ${size} MiB ($(ls "$bundle"/*.whl | xargs -n1 basename))"
[ "$size" -le 64 ] || { echo "the bundle exceeds 64 MiB" >&2; exit 1; }
