#!/usr/bin/env bash
# Install kdpipe (editable, with the dev tools) into a virtual environment.
#
# Uses the active virtual environment if there is one, else creates ./.venv. PyTorch is
# installed only when none is importable: `torch==2.13.0` is the CPU wheel on a machine that
# keeps it locally and PyPI's CUDA build on a GPU machine; a torch you installed yourself
# (any CUDA flavour) is kept. Extra pip arguments are passed through (e.g. '.[vllm]' extras).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PYTHON="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PYTHON=.venv/bin/python
fi

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==${KDPIPE_TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[dev]" "$@"
echo "kdpipe installed in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
