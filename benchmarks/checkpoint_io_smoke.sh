#!/usr/bin/env bash
# Smoke run of the checkpoint I/O benchmark: every way, a 20 MB checkpoint, on the CPU (~2.5 minutes on 2 busy cores: each step is a fresh process).
# Usage: bash benchmarks/checkpoint_io_smoke.sh   (uses .venv/bin/python when there, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/checkpoint_io.py \
    --device cpu --size-gb 0.02 --results "$out" "$@"
if grep -q '"status": "failed"\|"verified": false' "$out"/*.jsonl; then
    echo "smoke: a step failed or loaded wrong tensors (see above)" >&2
    exit 1
fi
echo "smoke: ok"
