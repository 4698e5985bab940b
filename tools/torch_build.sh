#!/usr/bin/env bash
# Usage: tools/torch_build.sh TORCH VENV DIST [maturin build arguments...]
# Builds the mobileone-rs wheel (abi3) for torch TORCH, a build row of torch-versions.txt, with VENV's
# torch, into DIST. It builds a copy of this checkout in target/torch-TORCH/src (the checkout is left as
# it is) whose Cargo.lock pins that torch's tch / torch-sys / pyo3-tch and whose pyproject.toml requires
# the torch range the build serves, with its own cargo target folder target/torch-TORCH/target (torch-sys
# caches the libtorch it found, so each torch gets its own).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
torch=$1 venv=$(cd "$2" && pwd) dist=$(mkdir -p "$3" && cd "$3" && pwd)
shift 3
table=$root/torch-versions.txt
read -r build tch < <(awk -v t="$torch" '$1 == t { print $2, $3 }' "$table")
if [ "${build:-}" != "$torch" ]; then
  echo "torch $torch has no build of its own in torch-versions.txt${build:+; the build for $build serves it}" >&2
  exit 2
fi
have=$("$venv/bin/python" -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')
[ "$have" = "$torch" ] || { echo "$venv has torch $have, not $torch" >&2; exit 2; }
served=$(awk -v b="$torch" '$2 == b { print $1 }' "$table")
first=$(head -1 <<<"$served") last=$(tail -1 <<<"$served")
requirement="torch>=$first,<${last%.*}.$((${last#*.} + 1))"

stage=$root/target/torch-$torch
rm -rf "$stage/src" && mkdir -p "$stage/src"
(cd "$root" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
  | tar -xf - -C "$stage/src"
cd "$stage/src"
cargo update -q -p pyo3-tch --precise "$tch"
sed -i -e "s|^dependencies = \[\"torch>=[^\"]*\"|dependencies = [\"$requirement\"|" \
  -e "s|\"torch==[0-9.*]*\"|\"torch==$torch.*\"|" pyproject.toml
grep -q "^dependencies = \[\"$requirement\"" pyproject.toml
# The wheel's version carries the torch it is built for as a local label (0.1.0+torch2.11), so wheels
# for two torches have different names and `pip show` says which one is installed.
sed -i -E "0,/^version = \"([^\"+]*)\"/s//version = \"\1+torch$torch\"/" Cargo.toml
grep -q "^version = \".*+torch$torch\"" Cargo.toml
# torch-sys insists on the exact release its tch was generated from, always X.Y.0; a patch release of
# that minor (2.9.1) keeps its ABI, and the minor was checked above. (Only then: setting the variable
# makes torch-sys rebuild.)
case $("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])') in
  *.0) ;;
  *) export LIBTORCH_BYPASS_VERSION_CHECK=1 ;;
esac
echo "building for torch $torch (tch $tch, requires $requirement) in $stage"
VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH CARGO_TARGET_DIR=$stage/target maturin build --release -o "$dist" "$@"
