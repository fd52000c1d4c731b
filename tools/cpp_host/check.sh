#!/usr/bin/env bash
# Build the C++ host and check it reproduces Python on the same tiles:
# labels bit for bit, class probabilities (and gated scores) to float32 round-off.
#
#   tools/cpp_host/check.sh            # TorchScript bundle
#   WSSS_CHECK_PT2=1 tools/cpp_host/check.sh   # also an AOTInductor .pt2 (compiles ~1-2 min):
#                                              # 2, 1 and 9 tiles (max batch 4), other tile sizes,
#                                              # a package without wsss_max_batch
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
    import json, re, zipfile
    from wsss.cli.export import export_pt2
    export_pt2(module, tiles, f"{work}/model.pt2", max_batch=4, metadata=bundle.metadata)
    runner = torch._inductor.aoti_load_package(f"{work}/model.pt2")
    meta = runner.get_metadata()
    assert meta.get("wsss_max_batch") == "4" and meta.get("wsss_tile_hw") == f"{size}x{size}", \
        f"check.sh: FAIL: the package's metadata says wsss_max_batch {meta.get('wsss_max_batch')!r}"

    def run_batches(t, max_batch):
        """The package on any number of tiles, as the host runs it (and as Python must): batches
        of at most max_batch; a batch of one (which the package refuses: its batch range starts
        at 2) as two copies of the tile, keeping the first result."""
        parts = []
        for i in range(0, t.shape[0], max_batch):
            chunk = t[i:i + max_batch]
            k = chunk.shape[0]
            with torch.inference_mode():
                out = runner(chunk.expand(2, -1, -1, -1).contiguous() if k == 1 else chunk)
            parts.append([o[:k] for o in out])
        return [torch.cat([p[j] for p in parts]) for j in range(3)]

    def expect(kind, t, max_batch):
        l2, s2, p2 = run_batches(t, max_batch)
        l2.numpy().tofile(f"{work}/expected_{kind}labels.u8")
        p2.numpy().astype(np.float32).tofile(f"{work}/expected_{kind}probs.f32")
        s2.numpy().astype(np.float32).tofile(f"{work}/expected_{kind}scores.f32")

    expect("pt2_", tiles, 4)
    # one tile, and nine: more than the package's max batch (4)
    hwc[:1].tofile(f"{work}/tiles1.rgb")
    expect("pt2one_", tiles[:1], 4)
    more = np.random.default_rng(1).integers(0, 256, (7, size, size, 3), dtype=np.uint8)
    hwc9 = np.ascontiguousarray(np.concatenate([hwc, more]))
    hwc9.tofile(f"{work}/tiles9.rgb")
    expect("pt2many_", torch.from_numpy(hwc9).permute(0, 3, 1, 2).contiguous(), 4)
    # a package as older wsss wrote it (no wsss_max_batch): the host runs it in batches of 2
    with zipfile.ZipFile(f"{work}/model.pt2") as src, zipfile.ZipFile(f"{work}/old.pt2", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if re.search(r"_metadata\.json$", info.filename):
                m = json.loads(data)
                m.pop("wsss_max_batch", None)
                data = json.dumps(m).encode()
            dst.writestr(info, data)
    hwc9[:3].tofile(f"{work}/tiles3.rgb")
    expect("pt2old_", torch.from_numpy(hwc9[:3]).permute(0, 3, 1, 2).contiguous(), 2)
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
  # any number of tiles: one (the package's batch range starts at 2), and more than its max batch
  for kind in one many; do
    tiles="$WORK/tiles1.rgb"; [[ $kind == many ]] && tiles="$WORK/tiles9.rgb"
    "$HOST" --ops "$OPS" --pt2 "$WORK/model.pt2" --tile "$tiles" --height 64 --width 64 \
      --labels "$WORK/pt2${kind}_labels.u8" --probs "$WORK/pt2${kind}_probs.f32" \
      --scores "$WORK/pt2${kind}_scores.f32" --threads "$THREADS" 2>"$WORK/err_${kind}.txt" \
      || { cat "$WORK/err_${kind}.txt"; echo "check.sh: FAIL: the .pt2 package on $tiles failed"; exit 1; }
    [[ ! -s "$WORK/err_${kind}.txt" ]] || { cat "$WORK/err_${kind}.txt"; echo "check.sh: FAIL: stderr not empty"; exit 1; }
    compare "pt2${kind}_"
  done
  echo "   pt2 on 1 tile and on 9 tiles (max batch 4): equal to Python's"
  "$HOST" --ops "$OPS" --pt2 "$WORK/old.pt2" --tile "$WORK/tiles3.rgb" --height 64 --width 64 \
    --labels "$WORK/pt2old_labels.u8" --probs "$WORK/pt2old_probs.f32" --scores "$WORK/pt2old_scores.f32" \
    --threads "$THREADS" 2>"$WORK/err_old.txt" \
    || { cat "$WORK/err_old.txt"; echo "check.sh: FAIL: a package without wsss_max_batch failed"; exit 1; }
  grep -q "has no wsss_max_batch metadata .*batches of 2" "$WORK/err_old.txt" \
    || { cat "$WORK/err_old.txt"; echo "check.sh: FAIL: no note on a package without wsss_max_batch"; exit 1; }
  compare "pt2old_"
  echo "   pt2 without wsss_max_batch (older export): batches of 2, equal to Python's"
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
