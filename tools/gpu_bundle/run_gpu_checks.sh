#!/usr/bin/env bash
# The offline GPU checks of mobileone-rs, from `make gpu-bundle TORCH=...` (README "GPU checks").
#   ./run_gpu_checks.sh [--device cuda|cpu] [--out DIR]      (default: cuda, ./results)
# Needs only Python with the torch this bundle is built for and pytest: nothing is installed or
# downloaded. Runs the device tests (tests/device, every device-generic test on that device), then the
# quick benchmark (bench/bench.py --quick), and writes DIR/gpu_checks.json with both. --device cpu runs
# the same end to end on a machine without a GPU. BENCH_ARGS adds benchmark options (e.g. --threads 1 on
# a busy CPU); TESTS_TIMEOUT and BENCH_TIMEOUT (seconds, default 330 and 200) bound the two parts.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
device=cuda out=$here/results
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--out DIR]" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONPATH=$here/pkg:$here${PYTHONPATH:+:$PYTHONPATH}
cd "$here"
start=$(date +%s)
"$py" -c "import torch, mobileone_rs; print('mobileone_rs', mobileone_rs.__version__, 'built for torch',
  mobileone_rs.TORCH_BUILT_FOR, '| torch', torch.__version__, '| CUDA', torch.cuda.is_available())" || exit 1
if [ "$device" != cpu ] && ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "torch.cuda.is_available() is False: run with --device cpu" >&2
  exit 2
fi
echo "== device tests on $device (log: $out/tests.log)"
timeout "${TESTS_TIMEOUT:-330}" "$py" -m pytest -p no:cacheprovider tests/device --device "$device" -q -rfEs -o junit_family=legacy \
  --junitxml "$out/tests.xml" > "$out/tests.log" 2>&1
tests_rc=$?
tail -n 3 "$out/tests.log"
echo "== bench/bench.py --device $device --quick (log: $out/bench.log)"
timeout "${BENCH_TIMEOUT:-200}" "$py" bench/bench.py --device "$device" --quick ${BENCH_ARGS:-} --out "$out/bench" > "$out/bench.log" 2>&1
bench_rc=$?
tail -n 25 "$out/bench.log"
"$py" collect_results.py "$out" "$device" "$tests_rc" "$bench_rc" "$(($(date +%s) - start))" \
  > "$out/gpu_checks.json"
echo "== $out/gpu_checks.json (tests exit $tests_rc, bench exit $bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
