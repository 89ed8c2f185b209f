#!/usr/bin/env bash
# Issue 6 on a machine with N >= 2 GPUs (device tool): results under $OUT.
set -uo pipefail
# distsave's needs the image lacks (xxhash) travel as wheels in .whl/ (benchmarks/README.md).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/distsave-multi-gpu}; mkdir -p "$OUT" /tmp/mg
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "== $N GPUs: $(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))')"
echo "== demo, plain python (distsave starts the replicas)"
python3 -m distsave.cli demo --workdir /tmp/demo-plain 2>&1 | grep "^|" | tee "$OUT/demo_plain.md"
echo "== demo under torchrun --nproc_per_node $N"
python3 -m torch.distributed.run --nproc_per_node "$N" -m distsave.cli demo --workdir /tmp/demo-torchrun 2>&1 \
    | grep "^|" | tee "$OUT/demo_torchrun.md"
echo "== save under Mirrored x$N, load under Mirrored x1, cuda:0, cpu"
python3 benchmarks/multi_gpu_check.py train /tmp/mg 2>&1 | grep "^{" | tee "$OUT/portability.jsonl"
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/multi_gpu_check.py load /tmp/mg 2>&1 | grep "^{" | tee -a "$OUT/portability.jsonl"
echo "== scaling"
python3 benchmarks/scaling.py --gpus $(seq -s ' ' 1 "$N") --per-replica 64 1024 2>&1 | grep "^|\|^#" | tee "$OUT/scaling.md"
echo "== raw benchmark logs (JSON lines)"
mkdir -p "$OUT/results" && cp benchmarks/results/*.jsonl "$OUT/results/" 2>/dev/null; ls "$OUT/results"
