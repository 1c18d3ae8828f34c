#!/usr/bin/env bash
# ONE device call (at most 9 minutes) on a lent H100/H200, in issue 16's order; every result is written under $OUT
# as soon as it exists, so a step cut short by its time limit still leaves the earlier ones:
#   1. environment and the build of fastpeft._C against the machine's torch (log kept)          ~2 min
#   2. selfcheck on CUDA, every backend and dtype: parity first (a wrong kernel is reported)     <1 min
#   3. kernel suite at the target shape, fused backward, then the split backward for comparison  ~3 min
#   4. serving: decode kernels (Triton, CUDA) vs copy bandwidth, 64 tenants vs 1                ~1 min
#   5. training step, PEFT vs fastpeft                                                           ~1.5 min
#   6. pytest -m gpu (what is left of the budget)
# bitsandbytes is not on that machine: to include the quantized GPU tests, download its wheel here first (device
# README: `pip download ... --python-version 3.12 -d .whl bitsandbytes==<version>`) and pass carry=[".whl"].
# Usage (device tool command, timeout_s=560):  bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/fastpeft-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FASTPEFT_BACKEND FASTPEFT_TRITON_BWD
start=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, say how it ended
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name exit $? after $((SECONDS - start))s"; tail -25 "$OUT/$name.txt"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

# 1. Build fastpeft._C against the machine's torch (offline, no isolation), capped so nvcc does not thrash memory.
# Not the CPU extension (~25 s of compile for a CPU path this session does not measure).
TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=8 FASTPEFT_BUILD_CUDA=1 FASTPEFT_BUILD_CPU=0 \
  step build 150 python3 -m pip install --no-deps --no-build-isolation -e .
python3 -m fastpeft info | tee -a "$OUT/gpu.txt"

# 2-5. Parity, then the suites (each writes OUT/<date>-<device>.{json,md,png}).
step selfcheck 60 python3 -m fastpeft.selfcheck
step bench_kernel 150 python3 -m fastpeft bench --suite kernel --out "$OUT/kernel-fused"
FASTPEFT_TRITON_BWD=split step bench_kernel_split 60 python3 -m fastpeft bench --suite kernel --quick \
  --out "$OUT/kernel-split"
step bench_serving 60 python3 -m fastpeft bench --suite serving --out "$OUT/serving"
step bench_training 90 python3 -m fastpeft bench --suite training --out "$OUT/training"

# 6. The gpu-marked tests with what is left of the 9 minutes (FASTPEFT_TEST_DEVICE=cuda: the kernel test files run
# their matrices on the GPU instead of the interpreter).
left=$((530 - (SECONDS - start)))
if [ "$left" -gt 30 ]; then
  FASTPEFT_TEST_DEVICE=cuda step pytest_gpu "$left" python3 -m pytest -q -m gpu tests -x -ra
else
  echo "== pytest_gpu skipped: ${left}s left"
fi
