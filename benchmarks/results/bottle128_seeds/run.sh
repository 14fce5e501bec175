#!/usr/bin/env bash
# run.sh MVTEC DTD SETTING SEED CORE: one run of docs/results.md's "Seed spread" table
# (bottle at 128 px, demo preset, EfficientNet-Lite0, 300 DTD textures, one thread on one core).
# SETTING: picked (the preset as it is: the best of four stage-1 students goes on),
# constant (the last student, as the papers), cosine (the last student, cosine-decayed rates).
set -euo pipefail
MVTEC=$1; DTD=$2; SETTING=$3; SEED=$4; CORE=$5
case "$SETTING" in
  picked) OPTIONS=() ;;
  constant) OPTIONS=(--student-checks 0) ;;
  cosine) OPTIONS=(--student-checks 0 --lr-schedule cosine) ;;
  *) echo "SETTING: picked, constant or cosine" >&2; exit 2 ;;
esac
OUT=runs/bottle128/$SETTING/seed$SEED
start=$(date +%s)
taskset -c "$CORE" pfadseg --threads 1 train --data "$MVTEC" --category bottle --model pfadseg \
  --teacher efficientnet_lite0 --preset demo --image-size 128 --textures "$DTD" --texture-limit 300 \
  --seed "$SEED" "${OPTIONS[@]}" --out "$OUT/run"
mid=$(date +%s)
taskset -c "$CORE" pfadseg --threads 1 test --checkpoint "$OUT/run/checkpoint.safetensors" \
  --data "$MVTEC" --category bottle --out "$OUT/test"
end=$(date +%s)
echo "train_s=$((mid - start)) test_s=$((end - mid))" > "$OUT/wall_seconds.txt"
