#!/usr/bin/env bash
# An MoE model served through the OpenAI endpoint by a fleet on two GPUs (issue 16),
# on a machine with no network:
#   bash bench/moe_fleet_gpu.sh OUT_DIR
# A Qwen3-30B-A3B-shaped checkpoint (LAYERS of its 48 layers, random bf16 weights, a
# full-vocabulary word tokenizer; kept in MODEL_DIR, where bench/ep_decode.py writes the
# same model, so a run after it reuses its checkpoint), served by two fleets in turn:
#   ep1: one decode node on cuda:0 holding every expert (CUDA graphs, as usual);
#   ep2: two decode nodes, on cuda:0 and cuda:1, forming one expert-parallel group,
#        each prefilling its own requests: what `lightctl up MODEL --prefill-nodes 0
#        --decode-nodes 2 --expert-parallel` starts.
# Each gets `lightctl bench` (python3 -m lightpd.controlplane.lightctl.bench) at each of RATES with
# COUNTS requests, through bench/serving_gpu.sh, whose knobs all apply (PARTS=fleet: no
# in-process engine run). Results: OUT_DIR/serving.tar.gz and OUT_DIR/summary.md.
# A CPU try (a small MoE, about two minutes):
#   SMALL=1 DEVICES=cpu WHEELS=none RATES="4 inf" COUNTS="8 12" INPUT_LEN=32 OUTPUT_LEN=8 \
#   DECODE_SLOTS=8192 WARMUP=1 PATH=.venv/bin:$PATH bash bench/moe_fleet_gpu.sh /tmp/out
set -uo pipefail
: "${SMALL:=}"
: "${LAYERS:=$([[ -n $SMALL ]] && echo 2 || echo 4)}"
export SMALL MODEL_ARGS="--shape qwen3-30b-a3b --layers $LAYERS"
export MODEL_DIR="${MODEL_DIR:-/tmp/lightpd-ep-models/qwen3-30b-a3b-${LAYERS}l${SMALL:+-tiny}}"
export FLEETS="${FLEETS:-ep1=0+1/auto ep2=0+2/auto/ep}"
export RATES="${RATES:-16 inf}" COUNTS="${COUNTS:-64 256}"
export PARTS="${PARTS:-fleet}"
exec bash "$(dirname "$0")/serving_gpu.sh" "$@"
