#!/usr/bin/env bash
# The KV hand-off on two GPUs of one host (issue 13), on a machine with no network:
#   bash bench/pd_gpu.sh OUT_DIR
# 1. the KV connector conformance suite on CUDA (NCCL between cuda:0 and cuda:1);
# 2. a Llama-3.1-8B-shaped random bf16 checkpoint (bench/serving_model.py);
# 3. bench/pd_ttft.py: a lone request's time to first token through a prefill node
#    on cuda:0 and a decode node on cuda:1, over NCCL and over ZeroMQ, against the
#    decode node prefilling it itself.
# Wheels the GPU image lacks come from the git-ignored .wheels/ (see gpu_run.sh).
set -uo pipefail
out=${1:?usage: bench/pd_gpu.sh OUT_DIR}
mkdir -p "$out"
if compgen -G ".wheels/*.whl" > /dev/null; then
  rm -rf /tmp/lightpd-site
  python3 -m pip install -q --no-index --no-deps --target /tmp/lightpd-site .wheels/*.whl
  export PYTHONPATH="/tmp/lightpd-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
LIGHTPD_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/common/test_kv_connector.py \
  > "$out/conformance.log" 2>&1; tail -3 "$out/conformance.log"
python3 -m bench.serving_model --out /tmp/lightpd-8b --device cuda:0 2>&1 \
  | grep -v "Writing model shards" | tail -3
python3 -m bench.pd_ttft --model /tmp/lightpd-8b --vocab 128000 --repeats ${REPEATS:-5} \
  ${TOKENS:+--tokens $TOKENS} 2>&1 | grep -v " INFO \| WARNING " | tee "$out/pd_ttft.md"
