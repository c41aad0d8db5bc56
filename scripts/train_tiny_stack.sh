#!/usr/bin/env bash
# Rebuild the committed trained tiny stack in models/tiny-reader/ from scratch (CPU, seed 0):
# the base model, its GistNet and its LensNet, and the megacontext.json that makes them the
# model's defaults. ~40 min on 2 cores. Usage: bash scripts/train_tiny_stack.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/tiny-reader}
MC=.venv/bin/mc-vllm
$MC train-base-model --out "$OUT" --seed 0
$MC train-gistnet --model "$OUT" --out "$OUT/megacontext/gistnet" --levels 1 2 \
    --lod2-teacher lod1 --steps 400 --batch 8 --seed 0
$MC train-lensnet --model "$OUT" --gistnet "$OUT/megacontext/gistnet" \
    --out "$OUT/megacontext/lensnet" --seed 0
cat > "$OUT/megacontext.json" <<JSON
{"gistnet": "megacontext/gistnet", "lensnet": "megacontext/lensnet",
 "megacontext": {"w_max": 256}}
JSON
rm -f "$OUT/checkpoint.pt" "$OUT"/megacontext/*/checkpoint.pt "$OUT"/megacontext/*/labels.pt
echo "[train_tiny_stack] done: $OUT"
