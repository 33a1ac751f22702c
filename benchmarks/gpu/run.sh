#!/usr/bin/env bash
# kdpipe's GPU benchmark in one call (benchmarks/gpu/bench.py says what it measures).
#
#   benchmarks/gpu/run.sh [--cpu-smoke] [--out DIR]
#
# Writes gpu_bench.json and gpu_bench.md to --out, else to $OUT where that is set (the GPU
# machine's output folder), else to runs/gpu-bench. Wheels that benchmarks/gpu/fetch_wheels.sh
# put in benchmarks/gpu/wheels are installed offline first, into a folder of their own (not
# with --cpu-smoke, which runs in the current environment).
# PYTHON picks the interpreter (default python3). --cpu-smoke runs every step at toy sizes on
# CPU, as CI does, so that GPU minutes go to measuring.
set -euo pipefail
cd "$(dirname "$0")/../.."

out="${OUT:-runs/gpu-bench}"
smoke=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=(--cpu-smoke) ;;
    --out) [ $# -ge 2 ] || { echo "run.sh: --out needs a folder" >&2; exit 2; }; out="$2"; shift ;;
    *) echo "run.sh: unknown argument '$1' (use --cpu-smoke and --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${PYTHON:-python3}"
wheels=(benchmarks/gpu/wheels/*.whl)
if [ ${#smoke[@]} -eq 0 ] && [ -e "${wheels[0]}" ]; then  # the smoke run uses this environment
  site="$(mktemp -d)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu/bench.py --out "$out" "${smoke[@]}"
