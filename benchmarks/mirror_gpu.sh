#!/usr/bin/env bash
# Issue 16's GPU runs (device tool, 4 GPUs): tests/gpu on 4, 2 and 1 GPUs, scaling, fit speed.
# Usage: OUT=/some/dir STAGES="tests4 scaling" bash benchmarks/mirror_gpu.sh
set -uo pipefail
# distsave's needs the image lacks (xxhash) travel as wheels in .whl/ (benchmarks/README.md).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:$PWD:/tmp/site" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/mirror-gpu}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/cards.txt"
for stage in ${STAGES:-tests4 scaling}; do
  echo "== $stage"
  case $stage in
    tests4) timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/gpu 2>&1 | tee "$OUT/tests4.log" | tail -25
            grep -q " passed" "$OUT/tests4.log" && ! grep -q "failed" "$OUT/tests4.log" || STAGES_FAILED=1 ;;
    tests2) [ -n "${STAGES_FAILED:-}" ] && continue; CUDA_VISIBLE_DEVICES=0,1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests2.log" | tail -8 ;;
    tests1) [ -n "${STAGES_FAILED:-}" ] && continue; CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests1.log" | tail -5 ;;
    scaling) timeout ${SCALING_S:-300} python3 benchmarks/scaling.py --gpus 1 2 4 --per-replica 64 1024 --repeats ${REPEATS:-1} 2>&1 | grep -v "^Epoch\|\[=" | tee "$OUT/scaling.md" | tail -30 ;;
    fit) timeout 200 python3 benchmarks/fit_speed.py --batch 64 1024 --repeats ${REPEATS:-1} --skip-lightning 2>&1 | grep "^|\|^#\|Error" | tee "$OUT/fit_speed.md" ;;
  esac
done
