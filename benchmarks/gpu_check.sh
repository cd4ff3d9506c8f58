#!/usr/bin/env bash
# Everything a lent NVIDIA GPU is for, in one run (a few minutes on one H100):
#   1. the CUDA tests: compiled sampling with CUDA graphs ("reduce-overhead") under
#      torch.cuda.set_sync_debug_mode("error"), callbacks and stateful guidance under graphs;
#   2. benchmarks/sampling_speed.py --device cuda: a small MLP and UNet at 10 and 50 steps,
#      eager and compiled tinydiff against diffusers, as ratios to the network floor.
# Needs a Python with a CUDA build of torch (and diffusers for the peer rows); nothing is
# downloaded. Results go to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}
"$py" - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
PY
status=0
"$py" -m pytest -q -rs -p no:cacheprovider -k "cuda" tests/test_compile.py 2>&1 | tee "$out/gpu_tests.txt" || status=1
"$py" benchmarks/sampling_speed.py --device cuda --out "$out/sampling_speed_cuda.md" 2>&1 \
    | tee "$out/gpu_sampling_speed.txt" || status=1
exit $status
