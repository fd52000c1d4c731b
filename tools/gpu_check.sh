#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with a CUDA GPU:
# build with CUDA kernels, run the op tests (CUDA tests and CPU/GPU parity included), then
# the op benchmarks on the GPU, and print the benchmark table.  Results land in ${OUT:-gpu_check}/.
#
#   tools/gpu_check.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
python - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch; run this on a GPU machine")
print("GPU:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
cap=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
echo "== build (CUDA arch $cap)"
WSSS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" python -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -3
python -m wsss.info | tee "$OUT/info.txt"
echo "== op tests (CUDA + parity)"
pytest tests/test_ops.py -q -rs 2>&1 | tee "$OUT/tests.txt" | tail -5
echo "== op benchmarks on the GPU"
WSSS_BENCH_DEVICE=cuda pytest benchmarks/bench_ops.py --benchmark-only -q \
  --benchmark-json="$OUT/bench_cuda.json" 2>&1 | tail -3
python tools/bench_table.py "$OUT/bench_cuda.json" | tee "$OUT/bench_cuda.md"
