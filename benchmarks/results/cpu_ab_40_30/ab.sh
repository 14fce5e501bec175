#!/bin/bash
# One side of the CPU A/B in docs/results.md: a 40 + 30-step bottle training and its test,
# pinned to one core, one thread; run both sides at once on different cores.
# usage: MVTEC=<mvtec_ad folder> DTD=<dtd folder> [OLD=<worktree at e78704e>] \
#        ab.sh old|new OUT CORE        (run from the repository root, its .venv)
set -eu
which=$1; out=$2; core=$3
COMMON="--data $MVTEC --category bottle --model pfadseg --teacher efficientnet_lite0 --preset cpu --textures $DTD/images --texture-limit 300 --stage1-steps 40 --stage2-steps 30 --save-every 100"
if [ "$which" = old ]; then  # e78704e had neither --device nor bf16 off by default
  run() { PYTHONPATH=$OLD taskset -c "$core" .venv/bin/python -c "import sys; from pfadseg.cli import main; sys.exit(main())" --threads 1 "$@"; }
  extra="--no-bf16"; dev=""
else
  run() { taskset -c "$core" .venv/bin/python -m pfadseg --threads 1 "$@"; }
  extra=""; dev="--device cpu"
fi
rm -rf "$out"
s=$(date +%s.%N); run train $COMMON $extra $dev --out "$out" > "$out.log" 2>&1; e=$(date +%s.%N)
echo "TRAIN_WALL $(echo "$e - $s" | bc)" >> "$out.log"
s=$(date +%s.%N); run test $extra $dev --checkpoint "$out/checkpoint.safetensors" --data "$MVTEC" --category bottle --out "$out/test" >> "$out.log" 2>&1; e=$(date +%s.%N)
echo "TEST_WALL $(echo "$e - $s" | bc)" >> "$out.log"
