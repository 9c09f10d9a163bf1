#!/usr/bin/env bash
# Run the GPU tests on a machine with no network access.
#   bash bench/gpu_run.sh OUT_DIR
# Wheels the image lacks (msgspec, ...) come from the git-ignored .wheels/ folder,
# made beforehand on a machine with network access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels msgspec
set -uo pipefail
out=${1:?usage: bench/gpu_run.sh OUT_DIR}
mkdir -p "$out"
if compgen -G ".wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/lightpd-site .wheels/*.whl
  export PYTHONPATH="/tmp/lightpd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$out/gpu.txt"
LIGHTPD_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/kernels tests/common \
  2>&1 | tee "$out/gpu_tests.log"
