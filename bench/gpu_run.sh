#!/usr/bin/env bash
# Everything GPU, on a machine with no network access:
#   bash bench/gpu_run.sh OUT_DIR [tests,attention,sweep,engine]
# Wheels the image lacks (msgspec, ...) come from the git-ignored .wheels/ folder,
# made beforehand on a machine with network access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels msgspec
# Writes gpu.txt, gpu_tests.log, attention.md, engine.json and engine.log to OUT_DIR.
set -uo pipefail
out=${1:?usage: bench/gpu_run.sh OUT_DIR [parts]}
parts=${2:-tests,attention,engine}
mkdir -p "$out"
if compgen -G ".wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/lightpd-site .wheels/*.whl
  export PYTHONPATH="/tmp/lightpd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
has() { [[ ",$parts," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$out/gpu.txt"
status=0
if has tests; then
  LIGHTPD_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/kernels tests/common \
    2>&1 | tee "$out/gpu_tests.log" | tail -5
  status=${PIPESTATUS[0]}
fi
if has attention; then
  python3 bench/attention_bench.py 2>&1 | tee "$out/attention.md"
fi
if has sweep; then
  python3 bench/attention_bench.py --sweep 2>&1 | tee "$out/attention_sweep.md"
fi
if has engine; then
  python3 bench/engine_bench.py --out "$out/engine.json" ${ENGINE_PARTS:+--only $ENGINE_PARTS} \
    2>&1 | tee "$out/engine.log"
fi
exit "$status"
