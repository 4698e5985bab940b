#!/usr/bin/env bash
# Usage: tools/torch_venv.sh TORCH VENV [wheel|dev]
# Creates VENV with torch TORCH.* (a minor release from torch-versions.txt) and its torchvision, plus
#   wheel: maturin only (what a wheel build needs);
#   dev:   everything the whole test suite needs (requirements-dev.txt, requirements-yolov9.txt, yolo9),
#          with their torch/torchvision pins replaced by TORCH's.
set -euo pipefail
cd "$(dirname "$0")/.."
torch=$1 venv=$2 kind=${3:-dev}
vision=$(awk -v t="$torch" '$1 == t { print $4 }' torch-versions.txt)
[ -n "$vision" ] || { echo "torch $torch is not in torch-versions.txt" >&2; exit 2; }
test -x "$venv/bin/python" || python3 -m venv "$venv"
pip=(tools/pip_install.sh "$venv/bin/python")
"${pip[@]}" --upgrade pip
pins=("torch==$torch.*" "torchvision==$vision")
if [ "$kind" = wheel ]; then
  "${pip[@]}" "${pins[@]}" 'maturin>=1.7,<2'
else
  reqs=$(mktemp)
  grep -h -v -E '^(torch|torchvision)==' requirements-dev.txt requirements-yolov9.txt > "$reqs"
  "${pip[@]}" "${pins[@]}" -r "$reqs"
  "${pip[@]}" --no-deps yolo9==1.0.18
  rm -f "$reqs"
fi
"$venv/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
