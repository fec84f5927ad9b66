#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (about ten minutes on one H200): the decoders'
# losslessness on CUDA (fp32: greedy HASS / EAGLE-2 output equal to plain decoding, `bench`'s
# "greedy equal"), their speed there (fp32 and bf16, fresh cache, fitted trees, order rotated),
# the shipped HASS draft's tau with the issues' protocol, EMS / padded batches against
# sequential decoding, and `prepare` + `train` on the GPU (loss tokens per second).
#
#   tools/gpu_check.sh [OUT]      (default runs/gpu-check; every log and JSON lands there)
#
# Every step runs whatever the one before did (a failed step is logged, not fatal); the
# summary at the end lists each step's exit status and time. DEVICE, LIMIT (questions per set)
# and NEW (new tokens) can be set for a quick dry run elsewhere, e.g. DEVICE=cpu LIMIT=1 NEW=8.
set -u
OUT=${1:-runs/gpu-check}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-3}
NEW=${NEW:-128}
STEP_TIMEOUT=${STEP_TIMEOUT:-420}
mkdir -p "$OUT"
export HASS_CACHE=${HASS_CACHE:-$(mktemp -d)}     # a fresh cache: the model converted, the cost curve measured
WORK=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {
    local name=$1; shift
    local start=$(date +%s)
    echo "== $name: $*"
    timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$SUMMARY"
    grep -v "it/s\]\|s/it\]" "$OUT/$name.log" | tail -n 40
}

{ nvidia-smi -L 2>&1 || true
  $PY -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

step bench-fp32 $PY -m hass bench --device "$DEVICE" --dtype fp32 --sets mt_bench,humaneval,gsm8k --limit "$LIMIT" \
    --methods plain,hass,eagle2,hf-prompt-lookup --max-new-tokens "$NEW" --temperature 0 1 --out "$OUT/bench-fp32"
step eval-hass $PY -m hass eval-draft --device "$DEVICE" --dtype fp32 --draft hass --questions 4,3,3 \
    --total-tokens 60 --depth 6 --top-k 10 --max-new-tokens "$NEW" --temperature 0 --out "$OUT/eval-hass.json"
step batch $PY -m hass batch --device "$DEVICE" --dtype fp32 --prompts-file assets/eval/mt_bench.jsonl --limit 8 \
    --method sequential,ems,padded --batch-size 4 --max-new-tokens 64 --json
step prepare $PY -m hass prepare --device "$DEVICE" --data assets/distill/heldout.jsonl --split held-out \
    --out "$WORK/heldout"
step train $PY -m hass train --device "$DEVICE" --data "$WORK/heldout" --out "$WORK/run" \
    --init assets/drafts/smollm2-135m-hass --align-steps 3 --topk-weight 1.0 --lr 1e-4 --batch-size 4 --max-steps 40
step bench-bf16 $PY -m hass bench --device "$DEVICE" --dtype bf16 --sets mt_bench,humaneval,gsm8k --limit "$LIMIT" \
    --methods plain,hass,hf-prompt-lookup --max-new-tokens "$NEW" --temperature 0 --out "$OUT/bench-bf16"
cp "$WORK/run/metrics.jsonl" "$OUT/train-metrics.jsonl" 2>/dev/null
echo "== summary"; cat "$SUMMARY"
