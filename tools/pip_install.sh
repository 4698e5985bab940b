#!/usr/bin/env bash
# Usage: tools/pip_install.sh PYTHON PIP-INSTALL-ARGS...
# `PYTHON -m pip install -q ARGS...`, retried: a fresh machine downloads ~4 GB (torch's CUDA wheels from
# PyPI), and one dropped connection must not fail a CI run. Within an attempt pip retries each request
# and resumes a cut download; a cut that resuming cannot mend (the server stops sending) gets a fresh
# pip run after a pause. Wheels an earlier attempt finished come from pip's cache, so only what is
# missing is downloaded again. PIP_INSTALL_ATTEMPTS (default 5) bounds the attempts.
set -uo pipefail
py=$1; shift
attempts=${PIP_INSTALL_ATTEMPTS:-5}
opts=(-q --retries 10)
# --resume-retries is pip >= 25.1; the first call (upgrading a venv's own old pip) may run without it.
if "$py" -m pip install --help 2>/dev/null | grep -q -- --resume-retries; then
  opts+=(--resume-retries 10)
fi
for ((i = 1; i <= attempts; i++)); do
  "$py" -m pip install "${opts[@]}" "$@" && exit 0
  rc=$?
  if ((i < attempts)); then
    echo "pip install failed (exit $rc, attempt $i of $attempts); retrying in $((20 * i)) s" >&2
    sleep $((20 * i))
  fi
done
echo "pip install failed $attempts times: $*" >&2
exit "$rc"
