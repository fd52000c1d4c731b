#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with a CUDA GPU:
# build with CUDA kernels, run the op tests (CUDA tests and CPU/GPU parity included), then
# the op benchmarks on the GPU, and print the benchmark table; then the runner's CUDA path
# (tests/test_runner_device.py: pinned staging, streams, one-batch-behind results, autocast
# agreement) and a smoke timing of the tile stage, overlapped vs synchronous, per precision.
# Results land in ${OUT:-gpu_check}/.
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
echo "== runner + bundle predictor on CUDA (pinned staging ring, copy streams, one-batch-behind, autocast)"
pytest tests/test_runner_device.py tests/test_bundle.py -q -rs -s 2>&1 | tee "$OUT/runner_cuda_tests.txt" | tail -12
echo "== runner tile stage on CUDA, demo bundle, 2048^2 slide (a smoke timing, not the benchmark)"
python - <<'PY' 2>&1 | tee "$OUT/runner_cuda_timing.txt"
import dataclasses, tempfile, warnings
from pathlib import Path
import numpy as np, tifffile, torch
warnings.filterwarnings("ignore")
from wsss.bundle import load_bundle
from wsss.runner import RunOptions, SlideModel, run_slide
tmp = Path(tempfile.mkdtemp())
img = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
tifffile.imwrite(tmp / "s.tif", img, tile=(256, 256), photometric="rgb", resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
bundle = load_bundle("wsss/assets/demo_bundle.pt")
opts = RunOptions(tissue="none", progress=False, batch_size=32, workers=4)
for precision in ("float32", "float16", "bfloat16"):
    m = SlideModel.from_bundle(bundle, device="cuda", precision=precision)
    run_slide(tmp / "s.tif", m, tmp / "warm", opts, log=lambda s: None)
    for name, mm in [("async", m), ("sync", dataclasses.replace(m, submit=None))] * 2:
        r = run_slide(tmp / "s.tif", mm, tmp / name, opts, log=lambda s: None)
        t = r.timings
        print(f"{precision:9s} {name:5s} tiles {t['tiles']:.3f}s  infer {t.get('infer', 0):.3f}s  "
              f"read(wait) {t.get('read (waiting)', 0):.3f}s  stitch {t.get('stitch', 0):.3f}s")
PY
