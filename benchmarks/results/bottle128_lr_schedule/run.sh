#!/usr/bin/env bash
# run.sh MVTEC DTD SCHEDULE SEED CORE: one run of docs/results.md's "Learning-rate schedule"
# (bottle at 128 px, demo preset, EfficientNet-Lite0, 300 DTD textures, one thread on one core).
set -euo pipefail
MVTEC=$1; DTD=$2; SCHEDULE=$3; SEED=$4; CORE=$5
OUT=runs/bottle128/$SCHEDULE/seed$SEED
start=$(date +%s)
taskset -c "$CORE" pfadseg --threads 1 train --data "$MVTEC" --category bottle --model pfadseg \
  --teacher efficientnet_lite0 --preset demo --image-size 128 --textures "$DTD" --texture-limit 300 \
  --lr-schedule "$SCHEDULE" --seed "$SEED" --out "$OUT/run"
mid=$(date +%s)
taskset -c "$CORE" pfadseg --threads 1 test --checkpoint "$OUT/run/checkpoint.safetensors" \
  --data "$MVTEC" --category bottle --out "$OUT/test"
end=$(date +%s)
echo "train_s=$((mid - start)) test_s=$((end - mid))" > "$OUT/wall_seconds.txt"
