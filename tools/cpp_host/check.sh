#!/usr/bin/env bash
# Build the C++ host and check it reproduces Python on the same tiles:
# labels bit for bit, class probabilities (and gated scores) to float32 round-off.
#
#   tools/cpp_host/check.sh            # TorchScript bundle
#   WSSS_CHECK_PT2=1 tools/cpp_host/check.sh   # also an AOTInductor .pt2 (compiles ~1-2 min)
#
# Env: PYTHON (default python3), BUILD_DIR (default tools/cpp_host/build), WSSS_HOST_THREADS (2).
# Exit 0 when the outputs agree; non-zero with a one-line reason otherwise.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-$HERE/build}"
THREADS="${WSSS_HOST_THREADS:-2}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/wsss-cpp-host.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "== build ($BUILD_DIR)"
cmake -S "$HERE" -B "$BUILD_DIR" -DPython3_EXECUTABLE="$(command -v "$PYTHON")" >"$WORK/cmake.log" 2>&1 \
  || { cat "$WORK/cmake.log"; echo "check.sh: cmake configure failed"; exit 1; }
cmake --build "$BUILD_DIR" -j 2 >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; echo "check.sh: build failed"; exit 1; }
HOST="$BUILD_DIR/wsss_host"

echo "== python: bundle, tiles, expected outputs"
"$PYTHON" - "$WORK" "$THREADS" "${WSSS_CHECK_PT2:-0}" <<'PY'
import sys, warnings
warnings.filterwarnings("ignore", category=FutureWarning)
import numpy as np, torch
import wsss
from wsss.bundle import save_bundle, load_bundle
from wsss.models import ResNet38Classifier, DeepLabV3Plus, TissueSegmenter

work, threads, pt2 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(threads)
torch.manual_seed(0)
module = TissueSegmenter(ResNet38Classifier(4, width=0.0625),
                         DeepLabV3Plus(4, backbone="resnet50", width=0.0625), eps=0.1).eval()
size = 64
meta = {"class_names": ["TE", "NEC", "LYM", "TAS"],
        "palette": [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]],
        "background_index": 4, "tile_size": size, "mpp": 1.0, "config": {"check": "cpp_host"}}
save_bundle(f"{work}/model.pt", module, meta)
try:
    from wsss.synthetic import render_tissue
    hwc = np.stack([render_tissue(size, size, seed=s)[0] for s in (1, 2)])
except ImportError:  # synthetic tissue not available: smooth random images
    hwc = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
hwc = np.ascontiguousarray(hwc, dtype=np.uint8)
hwc.tofile(f"{work}/tiles.rgb")
tiles = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
bundle = load_bundle(f"{work}/model.pt")
with torch.inference_mode():
    labels, scores, probs = bundle.module(tiles, True)
labels.numpy().tofile(f"{work}/expected_labels.u8")
probs.numpy().astype(np.float32).tofile(f"{work}/expected_probs.f32")
scores.numpy().astype(np.float32).tofile(f"{work}/expected_scores.f32")
if pt2:
    from wsss.cli.export import export_pt2
    export_pt2(module, tiles, f"{work}/model.pt2", max_batch=4, metadata=bundle.metadata)
    runner = torch._inductor.aoti_load_package(f"{work}/model.pt2")
    with torch.inference_mode():
        l2, s2, p2 = runner(tiles)
    l2.numpy().tofile(f"{work}/expected_pt2_labels.u8")
    p2.numpy().astype(np.float32).tofile(f"{work}/expected_pt2_probs.f32")
    s2.numpy().astype(np.float32).tofile(f"{work}/expected_pt2_scores.f32")
print(wsss._library.library_path())
PY
OPS="$("$PYTHON" -c 'import wsss; print(wsss._library.library_path())')"

compare() {  # compare KIND: labels bit for bit, probs/scores within float32 round-off
  local kind="$1"
  cmp "$WORK/expected_${kind}labels.u8" "$WORK/${kind}labels.u8" \
    || { echo "check.sh: FAIL: C++ ${kind}labels differ from Python"; exit 1; }
  "$PYTHON" - "$WORK" "$kind" <<'PY'
import sys, numpy as np
work, kind = sys.argv[1], sys.argv[2]
for name in ("probs", "scores"):
    a = np.fromfile(f"{work}/expected_{kind}{name}.f32", np.float32)
    b = np.fromfile(f"{work}/{kind}{name}.f32", np.float32)
    if a.shape != b.shape:
        sys.exit(f"check.sh: FAIL: {kind}{name}: {b.size} values from C++, {a.size} from Python")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    print(f"   {kind}{name}: {a.size} values, max |C++ - Python| = {diff:.3g}")
    if diff > 1e-5:
        sys.exit(f"check.sh: FAIL: {kind}{name} differ by {diff:.3g} (> 1e-5)")
PY
}

echo "== C++ host: bundle"
"$HOST" --ops "$OPS" --bundle "$WORK/model.pt" --tile "$WORK/tiles.rgb" --height 64 --width 64 \
  --labels "$WORK/labels.u8" --probs "$WORK/probs.f32" --scores "$WORK/scores.f32" --threads "$THREADS"
"$HOST" --ops "$OPS" --bundle "$WORK/model.pt" --print-metadata | grep -q '"class_names"' \
  || { echo "check.sh: FAIL: --print-metadata shows no class_names"; exit 1; }
compare ""
echo "   labels: bit for bit equal ($(stat -c %s "$WORK/labels.u8") bytes)"

if [[ "${WSSS_CHECK_PT2:-0}" == "1" ]]; then
  echo "== C++ host: AOTInductor package"
  "$HOST" --ops "$OPS" --pt2 "$WORK/model.pt2" --tile "$WORK/tiles.rgb" --height 64 --width 64 \
    --labels "$WORK/pt2_labels.u8" --probs "$WORK/pt2_probs.f32" --scores "$WORK/pt2_scores.f32" --threads "$THREADS"
  compare "pt2_"
  echo "   pt2 labels: bit for bit equal"
  # other tile sizes than the package's: one message and exit 2 (it read past its input before)
  head -c $((2 * 32 * 32 * 3)) "$WORK/tiles.rgb" > "$WORK/tiles32.rgb"
  set +e
  "$HOST" --ops "$OPS" --pt2 "$WORK/model.pt2" --tile "$WORK/tiles32.rgb" --height 32 --width 32 \
    --labels "$WORK/l32.u8" --probs "$WORK/p32.f32" 2>"$WORK/err32.txt"
  rc=$?
  set -e
  [[ $rc == 2 ]] && grep -q "is compiled for 64x64 tiles, got --height 32 --width 32" "$WORK/err32.txt" \
    && [[ ! -e "$WORK/l32.u8" ]] \
    || { cat "$WORK/err32.txt"; echo "check.sh: FAIL: a .pt2 run on 32x32 tiles was not refused (rc $rc)"; exit 1; }
  echo "   pt2 on other tile sizes: refused"
fi
echo "check.sh: OK"
