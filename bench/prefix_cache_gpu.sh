#!/usr/bin/env bash
# Prefix caching through the fleet (issue 17), cache on against off, on a machine with
# no network:
#   bash bench/prefix_cache_gpu.sh OUT_DIR
# A Llama-3.1-8B-shaped random bf16 checkpoint (bench/serving_model.py, kept in
# MODEL_DIR), a fleet of 1 prefill + 1 decode node over NCCL on DEVICES, and for each
# of CACHES (on: the nodes' default; off: --no-enable-prefix-caching; on-local: on, and
# a prompt of which at most LOCAL_TOKENS are not in its decode node's cache is
# prefilled there, without a hand-off; otherwise every prompt is handed off) two `lightctl
# bench` runs:
#   shared: NUM_SHARED completions whose prompts start with the same SHARED_LEN tokens,
#           then INPUT_LEN of their own, at RATE_SHARED requests/s;
#   chat:   CONVERSATIONS 4-turn chats replayed turn after turn (each turn's prompt
#           holds the conversation so far: a SHARED_LEN system message, CHAT_INPUT_LEN
#           new user tokens and CHAT_OUTPUT_LEN of reply per turn), at RATE_CHAT
#           conversations/s.
# The bench reports TTFT/TPOT percentiles, throughput, the cached share of prompt
# tokens (from the usage) and the KV moved prefill -> decode (from /metrics).
# Everything lands in OUT_DIR (results JSON, logs, summary.md).
: "${DEVICES:=cuda:0,cuda:1}" "${CACHES:=on off}" "${WHEELS:=.wheels}"
: "${SHARED_LEN:=2048}" "${INPUT_LEN:=256}" "${OUTPUT_LEN:=64}" "${NUM_SHARED:=128}"
: "${RATE_SHARED:=8}" "${CONVERSATIONS:=32}" "${CHAT_INPUT_LEN:=128}"
: "${CHAT_OUTPUT_LEN:=128}" "${RATE_CHAT:=2}" "${MAX_MODEL_LEN:=4096}"
: "${PREFILL_SLOTS:=98304}" "${DECODE_SLOTS:=196608}" "${SMALL:=}" "${LOCAL_TOKENS:=384}"
: "${MODEL_DIR:=/tmp/lightpd-serving-model${SMALL:+-small}}"
set -uo pipefail
out=${1:?usage: bench/prefix_cache_gpu.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
source bench/gpu_env.sh
step() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  step "writing the random checkpoint to $MODEL_DIR"
  python3 -m bench.serving_model --out "$MODEL_DIR" ${SMALL:+--small} 2>&1 \
    | grep -v "Writing model shards" || exit 1
fi
export MODEL_DIR OUT="$out" SHARED_LEN INPUT_LEN OUTPUT_LEN NUM_SHARED RATE_SHARED \
  CONVERSATIONS CHAT_INPUT_LEN CHAT_OUTPUT_LEN RATE_CHAT
inner='set -e
  common=(--base-url "$LIGHTPD_BENCH_URL" --tokenizer "$MODEL_DIR" --ignore-eos --seed 0)
  echo "== $(date +%T) cache $CACHE: shared prefix"
  python3 -m lightpd.controlplane.lightctl.bench "${common[@]}" --endpoint completions \
    --num-requests "$NUM_SHARED" --request-rate "$RATE_SHARED" --shared-prefix-len "$SHARED_LEN" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --warmup 4 \
    --label "shared-$CACHE" --out "$OUT/shared-$CACHE.json"
  echo "== $(date +%T) cache $CACHE: 4-turn chat replay"
  python3 -m lightpd.controlplane.lightctl.bench "${common[@]}" --endpoint chat --turns 4 \
    --num-requests $((4 * CONVERSATIONS)) --request-rate "$RATE_CHAT" \
    --shared-prefix-len "$SHARED_LEN" --input-len "$CHAT_INPUT_LEN" \
    --output-len "$CHAT_OUTPUT_LEN" --label "chat-$CACHE" --out "$OUT/chat-$CACHE.json"'
status=0
for cache in $CACHES; do
  flag="" setting=LIGHTPD_LOCAL_PREFILL_TOKENS=0
  [[ $cache == off ]] && flag="--no-enable-prefix-caching"
  # on-local: a prompt of which at most LOCAL_TOKENS are not in the decode node's cache
  # is prefilled there, with no hand-off.
  [[ $cache == on-local ]] && setting=LIGHTPD_LOCAL_PREFILL_TOKENS=$LOCAL_TOKENS
  step "fleet, cache $cache: 1 prefill + 1 decode node over NCCL on $DEVICES"
  CACHE=$cache python3 -m bench.serving_fleet --model "$MODEL_DIR" --devices "$DEVICES" \
    --prefill-nodes 1 --decode-nodes 1 --kv-transport nccl --logs "$out/logs-$cache" \
    --setting "$setting" \
    --prefill-args "--num-kv-slots $PREFILL_SLOTS --max-model-len $MAX_MODEL_LEN $flag" \
    --decode-args "--num-kv-slots $DECODE_SLOTS --max-model-len $MAX_MODEL_LEN $flag" \
    -- bash -c "$inner" 2>&1 | tee "$out/fleet-$cache.log" \
    | grep -v -E "^INFO:|registrar|heartbeat|Loading weights"
  (( status == 0 )) && status=${PIPESTATUS[0]}
done
step "summary"
for kind in shared chat; do
  for on in on on-local; do
    [[ -f $out/$kind-$on.json && -f $out/$kind-off.json ]] || continue
    python3 -m lightpd.controlplane.lightctl.bench --compare "$out/$kind-$on.json" "$out/$kind-off.json" \
      | tee -a "$out/summary.md"
  done
done
step "done"
exit "$status"
