#!/usr/bin/env bash
# run.sh MVTEC DTD SETTING SEED CORES [THREADS]: one run of docs/results.md's "The cpu preset on bottle" table
# (bottle at 256 px, cpu preset, EfficientNet-Lite0, 300 DTD textures; by default one thread on one core,
# e.g. CORES=0,1 THREADS=2 for one run on two idle cores).
# SETTING: picked (the preset as it is: the best of four stage-1 students goes on),
# last (the last student, as the papers: --student-checks 0).
# Run again after an interruption: it resumes from the run's last state file.
set -euo pipefail
MVTEC=$1; DTD=$2; SETTING=$3; SEED=$4; CORES=$5; THREADS=${6:-1}
case "$SETTING" in
  picked) OPTIONS=() ;;
  last) OPTIONS=(--student-checks 0) ;;
  *) echo "SETTING: picked or last" >&2; exit 2 ;;
esac
OUT=runs/bottle256/$SETTING/seed$SEED
[ -f "$OUT/run/train_state.safetensors" ] && OPTIONS+=(--resume)
start=$(date +%s)
taskset -c "$CORES" pfadseg --threads "$THREADS" train --data "$MVTEC" --category bottle --model pfadseg \
  --teacher efficientnet_lite0 --preset cpu --textures "$DTD" --texture-limit 300 \
  --seed "$SEED" "${OPTIONS[@]}" --out "$OUT/run"
mid=$(date +%s)
taskset -c "$CORES" pfadseg --threads "$THREADS" test --checkpoint "$OUT/run/checkpoint.safetensors" \
  --data "$MVTEC" --category bottle --out "$OUT/test"
end=$(date +%s)
echo "train_s=$((mid - start)) test_s=$((end - mid))" >> "$OUT/wall_seconds.txt"
