#!/bin/bash
# usage: ab.sh old|new OUTNAME CORE
which=$1; out=/work/runs/$2; core=$3
COMMON="--data /work/shared/data/mvtec_ad --category bottle --model pfadseg --teacher efficientnet_lite0 --preset cpu --textures /work/shared/data/dtd/images --texture-limit 300 --stage1-steps 40 --stage2-steps 30 --save-every 100"
if [ $which = old ]; then
  run() { PYTHONPATH=/work/baseline taskset -c $core /work/main/.venv/bin/python -c "import sys; from pfadseg.cli import main; sys.exit(main())" --threads 1 "$@"; }
  extra="--no-bf16"; dev=""
else
  run() { taskset -c $core /work/main/.venv/bin/python -m pfadseg --threads 1 "$@"; }
  extra=""; dev="--device cpu"
fi
rm -rf $out
s=$(date +%s.%N); run train $COMMON $extra $dev --out $out > $out.log 2>&1; e=$(date +%s.%N)
echo "TRAIN_WALL $(echo "$e - $s" | bc)" >> $out.log
s=$(date +%s.%N); run test $extra $dev --checkpoint $out/checkpoint.safetensors --data /work/shared/data/mvtec_ad --category bottle --out $out/test >> $out.log 2>&1; e=$(date +%s.%N)
echo "TEST_WALL $(echo "$e - $s" | bc)" >> $out.log
