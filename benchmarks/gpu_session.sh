#!/usr/bin/env bash
# One call on a lent H100/H200 (the device tool runs this from the repo root; $OUT comes back).
#   stage "check": build the CUDA extension, run the self-check and every gpu-marked test     (~5-8 min)
#   stage "bench": the benchmark suites, ceilings first; JSON + PNG + markdown under $OUT     (~5-9 min)
# Each stage reinstalls, since a machine that went idle comes back bare. bitsandbytes is not on that machine:
# to include the quantized GPU tests, download its wheel here first (see the device README,
# `pip download ... --python-version 3.12 -d .whl bitsandbytes==<version>`) and pass carry=[".whl"].
# Usage (device tool command):  bash benchmarks/gpu_session.sh check     |   bash benchmarks/gpu_session.sh bench
set -uo pipefail
stage=${1:-check}
OUT=${OUT:-/tmp/fastpeft-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FASTPEFT_BACKEND

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

# Build fastpeft._C against the machine's torch (offline, no isolation), capped so nvcc does not thrash memory.
TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=8 FASTPEFT_BUILD_CUDA=1 \
  python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
echo "build exit $?"; tail -3 "$OUT/build.log"
python3 -m fastpeft info | tee -a "$OUT/gpu.txt"

case "$stage" in
  check)
    python3 -m fastpeft.selfcheck 2>&1 | tee "$OUT/selfcheck.txt"
    # FASTPEFT_TEST_DEVICE=cuda: the kernel test files run their matrices on the GPU instead of the interpreter.
    FASTPEFT_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -m gpu tests -x -ra 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -40
    ;;
  bench)
    timeout 520 python3 -m fastpeft bench --suite "${2:-all}" --out "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -60
    ;;
  *) echo "unknown stage $stage (check|bench)"; exit 2 ;;
esac
