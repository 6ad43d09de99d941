#!/usr/bin/env bash
# The one prepared GPU check (issue 16), sized for a short lease on a lent GPU machine (~6 min on an H100/H200):
#   1. the Triton kernel tests on CUDA (tests/ops/test_triton_ops.py: values, gradients and states against the
#      float64 reference; on a GPU they run the compiled kernels, not the interpreter),
#   2. benchmarks/bench_cuda.py: Triton kernels vs the PyTorch chunked path vs causal SDPA (flash), fp32 and bf16.
# Logs and results go to $OUT (the device tool's return folder) or benchmarks/results/.
#
#   bash scripts/gpu_check.sh            # on the GPU machine, with its own python3 (torch + triton installed)
#   bash scripts/gpu_check.sh --smoke    # anywhere: the same steps on CPU in Triton's interpreter, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "${1:-}" = "--smoke" ] && PY=.venv/bin/python
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
if [ "${1:-}" = "--smoke" ]; then
  export TRITON_INTERPRET=1
  timeout 600 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_triton_ops.py -k "not compile" \
    2>&1 | tail -3 || status=1
  timeout 300 "$PY" benchmarks/bench_cuda.py --smoke --methods triton chunked sdpa >/dev/null || status=1
  echo "smoke: $([ $status = 0 ] && echo ok || echo FAILED)"
  exit $status
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu_machine.txt"
timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_triton_ops.py 2>&1 | tee "$OUT/triton_tests.log" \
  || status=1
timeout 300 "$PY" benchmarks/bench_cuda.py --lengths 1024 2048 4096 8192 16384 32768 --dtypes fp32 bf16 \
  --max-pp 4096 2>&1 | tee "$OUT/bench_cuda.log" || status=1
[ "$OUT" != benchmarks/results ] && cp benchmarks/results/bench_cuda.md benchmarks/results/bench_cuda.json "$OUT/" 2>/dev/null
exit $status
