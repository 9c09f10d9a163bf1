#!/usr/bin/env bash
# Serving figures of fleet shapes against the in-process engine, on a machine with no network:
#   bash bench/serving_gpu.sh OUT_DIR
# 1. writes a Llama-3.1-8B-shaped random bf16 checkpoint (bench/serving_model.py, given
#    MODEL_ARGS such as "--shape qwen3-30b-a3b --layers 4"; kept in MODEL_DIR and reused
#    by later runs on the same machine);
# 2. for each fleet in FLEETS, LABEL=P+D/TRANSPORT[/ep] (P prefill nodes, D decode nodes,
#    the KV transport; /ep: the decode nodes form one expert-parallel group), starts
#    Redis, the control plane and the nodes, each node on the next of DEVICES in turn
#    (prefill nodes first), and runs `lightctl bench` at each
#    rate in RATES with COUNTS requests (prompts of INPUT_LEN token ids, OUTPUT_LEN
#    tokens with --ignore-eos, Poisson arrivals, goodput under SLO), recording each
#    process's CPU time;
# 3. replays the same requests at the same arrival times into the in-process engine on
#    ENGINE_DEVICE (bench/serving_engine.py, DECODE_SLOTS of KV);
# 4. prints every path per rate (bench/serving_table.py).
# Everything lands in OUT_DIR/serving.tar.gz (results, plots, logs; re-packed after every
# step, so a run cut short still returns what it measured), plus summary.md and
# disagg.png. Knobs (environment); the defaults are issue 13's two-GPU rows:
#   nccl: 1 prefill + 1 decode node over NCCL, zmq: the same over ZeroMQ,
#   colocated: two decode nodes prefilling locally; and the engine on one GPU.
: "${DEVICES:=cuda:0,cuda:1}" "${ENGINE_DEVICE:=cuda:0}"
: "${FLEETS:=nccl=1+1/nccl zmq=1+1/zmq colocated=0+2/auto}"
: "${RATES:=4 16 32 64 inf}" "${COUNTS:=32 96 192 256 320}" "${SLO:=ttft=300,tpot=12}"
: "${INPUT_LEN:=512}" "${OUTPUT_LEN:=128}" "${WARMUP:=8}" "${SEED:=0}"
: "${PREFILL_SLOTS:=98304}" "${DECODE_SLOTS:=262144}" "${MAX_MODEL_LEN:=2048}"
: "${PARTS:=fleet,engine}" "${SMALL:=}" "${MODEL_DIR:=/tmp/lightpd-serving-model${SMALL:+-small}}"
: "${MODEL_ARGS:=}"  # more bench.serving_model options: another shape, fewer layers
: "${WHEELS:=.wheels}"  # cp312 wheels the GPU image lacks; WHEELS=none where all is installed
# One GPU, the issue-7 shape (both nodes share it):
#   DEVICES=cuda:0 FLEETS="fleet=1+1/auto" PREFILL_SLOTS=49152 DECODE_SLOTS=163840
# A CPU try of the whole script (about two minutes): SMALL=1 DEVICES=cpu ENGINE_DEVICE=cpu
#   WHEELS=none RATES="8 inf" COUNTS="16 24" INPUT_LEN=64 OUTPUT_LEN=16 PREFILL_SLOTS=8192
#   DECODE_SLOTS=8192 WARMUP=2 PATH=.venv/bin:$PATH bash bench/serving_gpu.sh /tmp/out
set -uo pipefail
out=${1:?usage: bench/serving_gpu.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/lightpd-serving.XXXX)
mkdir -p "$work/logs"
source bench/gpu_env.sh
if [[ $DEVICES == cuda* ]] && ! python3 -c "import torch; assert torch.cuda.is_available()"; then
  echo "DEVICES=$DEVICES but torch sees no GPU" >&2; exit 2
fi
export PYTHONUNBUFFERED=1
has() { [[ ",$PARTS," == *",$1,"* ]]; }
pack() { tar -czf "$out/serving.tar.gz" -C "$work" . 2>/dev/null; }
step() { echo "== $(date +%T) $*" | tee -a "$work/steps.log"; }
read -ra rates <<< "$RATES"
read -ra counts <<< "$COUNTS"
if (( ${#rates[@]} != ${#counts[@]} )); then
  echo "RATES and COUNTS must have as many entries" >&2; exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "DEVICES=$DEVICES ENGINE_DEVICE=$ENGINE_DEVICE FLEETS='$FLEETS' SLO=$SLO"
  echo "RATES='$RATES' COUNTS='$COUNTS' INPUT_LEN=$INPUT_LEN OUTPUT_LEN=$OUTPUT_LEN"
  echo "WARMUP=$WARMUP SEED=$SEED PREFILL_SLOTS=$PREFILL_SLOTS DECODE_SLOTS=$DECODE_SLOTS"
  echo "MAX_MODEL_LEN=$MAX_MODEL_LEN MODEL_DIR=$MODEL_DIR SMALL=${SMALL:-no}"
} | tee "$work/setup.txt"

step "model"
if [[ ! -f $MODEL_DIR/config.json ]]; then
  python3 -m bench.serving_model --out "$MODEL_DIR" --device "${DEVICES%%,*}" ${SMALL:+--small} $MODEL_ARGS \
    2>&1 | grep -v "Writing model shards" | tee -a "$work/steps.log" || exit 1
fi

# Options both sides share, so the fleet and the engine see the very same requests.
workload=(--input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --ignore-eos --seed "$SEED"
          --warmup "$WARMUP" --slo "$SLO")
node_args="--max-model-len $MAX_MODEL_LEN"
status=0
if has fleet; then
  # The inner script runs once a fleet is up; LIGHTPD_BENCH_URL and OPENAI_API_KEY are set.
  inner='for i in "${!rates[@]}"; do
    r=${rates[$i]}; n=${counts[$i]}
    echo "== $(date +%T) $LABEL: rate $r, $n requests"
    before=$(python3 -m bench.serving_fleet --cpu-of "$LIGHTPD_BENCH_PIDS")
    python3 -m lightpd.controlplane.lightctl.bench --base-url "$LIGHTPD_BENCH_URL" --endpoint completions \
      --tokenizer "$MODEL_DIR" --request-rate "$r" --num-requests "$n" "${workload[@]}" \
      --label "${LABEL}_rate$r" --out "$WORK/${LABEL}_rate$r.json" --plots "$WORK/plots" \
      || exit 1
    after=$(python3 -m bench.serving_fleet --cpu-of "$LIGHTPD_BENCH_PIDS")
    echo "{\"before\": $before, \"after\": $after}" > "$WORK/cpu_${LABEL}_rate$r.json"
    python3 -m bench.serving_fleet --phases-of "$LIGHTPD_BENCH_URL" --last "$n" \
      > "$WORK/phases_${LABEL}_rate$r.json"
    tar -czf "$OUT/serving.tar.gz" -C "$WORK" . 2>/dev/null
  done'
  export MODEL_DIR WORK="$work" OUT="$out"
  for fleet in $FLEETS; do
    label=${fleet%%=*} shape=${fleet#*=}
    prefill=${shape%%+*} rest=${shape#*+}
    decode=${rest%%/*} transport=${rest#*/} ep=
    if [[ $transport == */ep ]]; then transport=${transport%/ep} ep=--expert-parallel; fi
    step "fleet $label: $prefill prefill + $decode decode nodes${ep:+ (one expert-parallel group)} on $DEVICES, KV over $transport"
    LABEL=$label python3 -m bench.serving_fleet --model "$MODEL_DIR" --devices "$DEVICES" \
      --prefill-nodes "$prefill" --decode-nodes "$decode" --kv-transport "$transport" $ep \
      --logs "$work/logs/$label" \
      --prefill-args "--num-kv-slots $PREFILL_SLOTS $node_args" \
      --decode-args "--num-kv-slots $DECODE_SLOTS $node_args" \
      -- bash -c "rates=(${rates[*]}); counts=(${counts[*]}); workload=(${workload[*]}); $inner" \
      2>&1 | tee "$work/fleet_$label.log" | grep -v -E "^INFO:|registrar|heartbeat"
    fleet_status=${PIPESTATUS[0]}
    (( status == 0 )) && status=$fleet_status
    pack
  done
fi
if has engine; then
  step "in-process engine on $ENGINE_DEVICE, the same requests"
  python3 -m bench.serving_engine --model "$MODEL_DIR" --device "$ENGINE_DEVICE" \
    --rates "${rates[@]}" --num-requests "${counts[@]}" "${workload[@]}" \
    --num-kv-slots "$DECODE_SLOTS" --max-model-len "$MAX_MODEL_LEN" --out-dir "$work" --plots \
    2>&1 | tee "$work/engine.log" | grep -v "Loading weights"
  engine_status=${PIPESTATUS[0]}
  (( status == 0 )) && status=$engine_status
  pack
fi
step "summary"
python3 -m bench.serving_table "$work" --plot "$work/disagg.png" | tee "$work/summary.md"
cp "$work/summary.md" "$work/disagg.png" "$out/" 2>/dev/null
pack
step "done: $out/serving.tar.gz"
exit "$status"
