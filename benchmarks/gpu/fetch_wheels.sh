#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU machine lacks for kdpipe, into
# benchmarks/gpu/wheels (git-ignored; carry it to the GPU machine, where run.sh installs it
# offline). That machine has PyTorch with CUDA, transformers, pyarrow, typer, tqdm,
# safetensors, pyyaml, fsspec, pandas and peft under CPython 3.12, but not `datasets` (with
# its `dill` and `multiprocess`) or `zstandard`, which kdpipe declares.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d wheels \
  "datasets>=3.0" "dill>=0.3" "multiprocess>=0.70" "zstandard>=0.22"
ls -l wheels
