#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with a CUDA GPU. Steps, most important first
# (each is capped by its own timeout; a failing step is reported and the next one still runs):
#   1. build with CUDA kernels for this GPU's architecture;
#   2. op tests (every op on cpu and cuda, CUDA/CPU parity, device checks);
#   3. runner + bundle predictor tests on CUDA (pinned staging ring, copy streams,
#      one-batch-behind results, autocast agreement, blending on the device vs the host);
#   4. runner benchmark on CUDA: reference-width bundle, model-only (pipelined) vs the runner's
#      tile stage and whole run with device blending (WSSS_BENCH_PIPELINES adds host blending
#      and synchronous model calls) on a WSSS_BENCH_SIZE^2 (default 16384^2) synthetic slide;
#      4 slides with and without background outputs;
#   5. model benchmarks on CUDA: reference widths, batch 32, eager/scripted x
#      fp32/bf16/bf16-autocast/fp16-autocast, and precision agreement of the trained demo bundle;
#   6. the demo bundle's tile stage, overlapped vs synchronous, per precision (a smoke timing);
#   7. wsss-infer on the real slide (../shared/data/slides/cmu-1-small-region.svs, or WSSS_REAL_SLIDE) on CUDA;
#   8. op benchmarks on CUDA.
# Results (logs, benchmark JSON and tables) land in ${OUT:-gpu_check}/; the exit status is the
# number of failed steps.  A test that crashes the interpreter is named, backtraced with
# cuda-gdb where it is installed, and deselected so that the others still run.
#
# Step names: build op_tests runner_tests bench_runner bench_models runner_smoke real_slide bench_ops.
#
#   tools/gpu_check.sh                          # every step, from the repository root
#   tools/gpu_check.sh op_tests runner_tests    # some steps (the build is skipped when the
#                                               # installed wsss already has CUDA kernels)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
# NB: PYTHONSAFEPATH: `python -m`/`python -` must import the installed wsss (with its op library),
# not the source folder that is the working directory
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning PYTHONSAFEPATH=1
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, report status and seconds
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "== $name"
    t0=$(date +%s)
    # NB: through bash -c so that steps may be shell functions (exported with export -f)
    timeout "$limit" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
    [ "$rc" = 0 ] || failed=$((failed + 1))
    return "$rc"
}

python - <<'PY' || exit 1
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch; run this on a GPU machine")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {torch.get_num_threads()} CPU threads")
PY
cap=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
export cap

build() {
    WSSS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        python -m pip install --no-build-isolation --no-deps -q . && python -m wsss.info
}
export -f build
ALL="build op_tests runner_tests bench_runner bench_models runner_smoke real_slide bench_ops"
STEPS=" ${*:-$ALL} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
has_cuda_kernels() {
    python -c "import sys, wsss; from wsss._build_info import BUILD_INFO; sys.exit(0 if BUILD_INFO['with_cuda'] else 1)" 2>/dev/null
}
if want build || ! has_cuda_kernels; then
    step build 420 build || { echo "gpu_check: the build failed; nothing else can run"; exit 1; }
fi

pytest_surviving_crashes() {  # pytest ARGS...: rerun without any test that kills the interpreter
    local deselect=() rc crashed i
    for i in 1 2 3 4 5; do
        python -X faulthandler -m pytest -v -rs "$@" "${deselect[@]}" > "$OUT/pytest.$i.log" 2>&1
        rc=$?
        grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Fatal" "$OUT/pytest.$i.log" | grep -v " PASSED" | tail -n 40
        # exit 0-5 is pytest's own verdict; anything else (139: SIGSEGV, 134: abort) is a crash
        [ "$rc" -le 5 ] && { [ "${#deselect[@]}" = 0 ] && return "$rc"; echo "(with $(( ${#deselect[@]} / 2 )) crashing test(s) deselected)"; return 1; }
        crashed=$(grep -oE "^tests/[a-z_]+\.py::[^ ]+" "$OUT/pytest.$i.log" | tail -n 1)
        echo "CRASH: exit $rc in $crashed"
        [ -n "$crashed" ] || return "$rc"
        if [ "$i" = 1 ] && command -v cuda-gdb > /dev/null; then
            timeout 150 cuda-gdb -batch -ex "set pagination off" -ex run -ex "bt 40" -ex "info threads" \
                --args python -m pytest -q -p no:faulthandler "$crashed" > "$OUT/crash_backtrace.log" 2>&1
            grep -E "^#|signal|Thread|^\*" "$OUT/crash_backtrace.log" | head -n 60
        fi
        deselect+=(--deselect "$crashed")
    done
    return 1
}
export -f pytest_surviving_crashes
want op_tests && step op_tests 300 pytest_surviving_crashes tests/test_ops.py tests/test_library.py
want runner_tests && step runner_tests 240 pytest_surviving_crashes tests/test_runner_device.py tests/test_band_stitching.py tests/test_bundle.py tests/test_reading.py -s

# NB: 16384^2, 2 rounds, device blending only: the configuration of docs/runner.md's GPU table
# (~100 s on an H200, 32768^2 in 1 round ~165 s); WSSS_BENCH_PIPELINES=overlapped,host-blend,synchronous
# adds the others; WSSS_BENCH_K="model_only or end_to_end" leaves out the many-slides bench (~30 s)
want bench_runner && step bench_runner 300 env WSSS_BENCH_DEVICE=cuda WSSS_BENCH_MODELS=reference WSSS_BENCH_BATCH=32 \
    WSSS_BENCH_WORKERS=4 WSSS_BENCH_SIZE="${WSSS_BENCH_SIZE:-16384}" WSSS_BENCH_ROUNDS="${WSSS_BENCH_ROUNDS:-2}" \
    WSSS_BENCH_PIPELINES="${WSSS_BENCH_PIPELINES:-overlapped}" WSSS_BENCH_MANY_SIZE=2048 \
    python -m pytest benchmarks/bench_runner.py --benchmark-only -q -k "${WSSS_BENCH_K:-model_only or end_to_end or many_slides}" \
    --benchmark-json="$OUT/bench_runner_cuda.json"
want bench_models && step bench_models 300 env WSSS_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_models.py --benchmark-only -q -s \
    -k "${WSSS_GPU_CHECK_MODELS_K:-not compiled}" --benchmark-json="$OUT/bench_models_cuda.json"
[ -s "$OUT/bench_runner_cuda.json" ] && python - "$OUT/bench_runner_cuda.json" <<'PY'
import json, sys
keys = ("pipeline", "stitch_device", "readers", "engine", "background_outputs", "tiles", "batch", "workers", "precision", "model_mpx_per_s", "model_only_mpx_per_s", "tile_stage_mpx_per_s", "first_tile_stage_overhead", "first_total_overhead",
        "total_mpx_per_s", "tile_stage_overhead", "tile_stage_overhead_best", "tile_stage_overhead_paired",
        "total_overhead", "total_overhead_paired", "early_pyramid", "overhead_s", "stages_s")
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    print(b["name"], "median %.3f s" % b["stats"]["median"], {k: b["extra_info"][k] for k in keys if k in b["extra_info"]})
PY
[ -s "$OUT/bench_runner_cuda.json" ] && python tools/bench_table.py "$OUT/bench_runner_cuda.json" --runner
for kind in models; do
    json="$OUT/bench_${kind}_cuda.json"
    [ -s "$json" ] || continue
    flag=""; [ "$kind" = models ] && flag="--models"
    python tools/bench_table.py "$json" $flag > "$OUT/bench_${kind}_cuda.md" 2>&1 && cat "$OUT/bench_${kind}_cuda.md"
done

smoke() {
    python - <<'PY'
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
opts = RunOptions(tissue="none", progress=False)  # the CUDA defaults: batch 32, 4 readers
for precision in ("float32", "float16", "bfloat16"):
    m = SlideModel.from_bundle(bundle, device="cuda", precision=precision)
    run_slide(tmp / "s.tif", m, tmp / "warm", opts, log=lambda s: None)
    for name, mm in [("async", m), ("sync", dataclasses.replace(m, submit=None))] * 2:
        r = run_slide(tmp / "s.tif", mm, tmp / name, opts, log=lambda s: None)
        t = r.timings
        print(f"{precision:9s} {name:5s} tiles {t['tiles']:.3f}s  infer {t.get('infer', 0):.3f}s  "
              f"read(wait) {t.get('read (waiting)', 0):.3f}s  stitch {t.get('stitch', 0):.3f}s  "
              f"device-blend queueing {t.get('stitch (device, queueing)', 0):.3f}s  "
              f"band writer {t.get('stitch (band writer)', 0):.3f}s")
PY
}
export -f smoke
want runner_smoke && step runner_smoke 120 smoke

slide=${WSSS_REAL_SLIDE:-../shared/data/slides/cmu-1-small-region.svs}
if ! want real_slide; then
    :
elif [ -f "$slide" ]; then
    step real_slide 120 python -m wsss.cli.infer "$slide" --model wsss/assets/demo_bundle.pt --device cuda \
        -o "$OUT/cmu" --no-progress
    [ -f "$OUT/cmu/cmu-1-small-region/run.json" ] && python -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps(r['timings_s'], indent=1))" "$OUT/cmu/cmu-1-small-region/run.json"
else
    echo "== real_slide: skipped ($slide is absent)"
fi
want bench_ops && step bench_ops 180 env WSSS_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_ops.py --benchmark-only -q \
    --benchmark-json="$OUT/bench_ops_cuda.json"
[ -s "$OUT/bench_ops_cuda.json" ] && python tools/bench_table.py "$OUT/bench_ops_cuda.json" > "$OUT/bench_ops_cuda.md" 2>&1 && cat "$OUT/bench_ops_cuda.md"
echo "gpu_check: $failed step(s) failed"
exit "$failed"
