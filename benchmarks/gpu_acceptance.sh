#!/usr/bin/env bash
# The GPU acceptance runs, for a machine with CUDA (the device tool): results under $OUT.
# Usage: OUT=/some/dir bash benchmarks/gpu_acceptance.sh
set -uo pipefail
# distsave's needs the image lacks (xxhash) travel as wheels in .whl/ (benchmarks/README.md).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/distsave-gpu}
mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
echo "== OneDevice cuda:0, 2 epochs"
python3 examples/train_mnist.py --one-device cuda:0 --epochs 2 --seed 0 --save /tmp/gpu_model --report /tmp/one
echo "== MirroredStrategy() over every GPU, 2 epochs"
python3 examples/train_mnist.py --epochs 2 --seed 0 --report /tmp/mirrored
python3 - <<'PY'
import json, os, torch, distsave
out = os.environ["OUT"]
test = distsave.datasets.load("mnist", split="test").map(lambda i, l: (i.float() / 255, l)).batch(1000)
images = next(iter(test))[0]
model = distsave.load_model("/tmp/gpu_model")
from safetensors.torch import save_file
save_file({"images": images, "predictions": model.predict(images).cpu()}, f"{out}/gpu_predictions.safetensors")
reports = {name: json.load(open(f"/tmp/{name}.0.json")) for name in ("one", "mirrored")}
json.dump(reports, open(f"{out}/gpu_reports.json", "w"), indent=1)
print(json.dumps(reports, indent=1))
PY
tar -C /tmp -cf "$OUT/gpu_model.tar" gpu_model
echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/saving/test_saved_model.py tests/layers 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
echo "== distsave demo on the GPU"
python3 -m distsave.cli demo --workdir /tmp/demo 2>&1 | tee "$OUT/demo.log" | tail -20
echo "== distsave demo under torchrun (one process per GPU)"
python3 -m torch.distributed.run --nproc_per_node "$(python3 -c 'import torch; print(torch.cuda.device_count())')" \
    -m distsave.cli demo --workdir /tmp/demo-torchrun 2>&1 | tail -16 > "$OUT/demo_torchrun.log"
tail -3 "$OUT/demo_torchrun.log"
echo "== fit speed (3 interleaved runs)"
python3 benchmarks/fit_speed.py --batch 64 1024 --repeats 3 2>&1 | grep "^|\|^#" | tee "$OUT/fit_speed.md"
echo "== scaling over the GPUs this machine has"
python3 benchmarks/scaling.py --gpus $(seq -s ' ' 1 "$(python3 -c 'import torch; print(torch.cuda.device_count())')") \
    --per-replica 64 1024 2>&1 | grep "^|\|^#" | tee "$OUT/scaling.md"
echo "== raw benchmark logs (JSON lines)"
tar -C benchmarks -cf "$OUT/results.tar" results && tar -tf "$OUT/results.tar"   # one file: the device returns at most 8
