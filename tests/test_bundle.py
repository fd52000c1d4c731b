"""Bundles: save -> load -> same outputs, metadata, error messages, predictor precisions."""
from __future__ import annotations

import json
import os
import re
import warnings
import zipfile

import pytest
import torch

from wsss.bundle import (BUNDLE_FORMAT_VERSION, METADATA_FILE, load_bundle, read_bundle_metadata, save_bundle,
                         script_module)
from wsss.errors import BundleError
from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices

META = {
    "class_names": ["TE", "NEC", "LYM", "TAS"],
    "palette": [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]],
    "background_index": 4,
    "tile_size": 64,
    "mpp": 1.0,
    "input_scale": 1 / 255,
    "gate_eps": 0.1,
    "config": {"note": "test"},
}


def _segmenter_module(seed: int = 0) -> TissueSegmenter:
    torch.manual_seed(seed)
    clf = ResNet38Classifier(4, width=0.0625)
    seg = DeepLabV3Plus(4, backbone="resnet50", width=0.0625)
    return TissueSegmenter(clf, seg, eps=0.1).eval()


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    save_bundle(path, _segmenter_module(), META)
    return path


def _tiles(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_save_load_roundtrip_matches_eager(tmp_path):
    module = _segmenter_module()
    digest = save_bundle(tmp_path / "b.pt", module, META)
    bundle = load_bundle(tmp_path / "b.pt")
    assert bundle.sha256 == digest and len(digest) == 64
    assert isinstance(bundle.module, torch.jit.ScriptModule)
    tiles = _tiles()
    for a, b in zip(module(tiles, True), bundle.module(tiles, True)):
        assert torch.equal(a, b)
    meta = bundle.metadata
    assert meta["format"] == "wsss-bundle" and meta["format_version"] == BUNDLE_FORMAT_VERSION
    assert meta["class_names"] == META["class_names"] and meta["palette"] == META["palette"]
    assert meta["torch_version"] == torch.__version__ and len(meta["content_hash"]) == 64
    assert read_bundle_metadata(tmp_path / "b.pt") == meta
    assert [p.name for p in tmp_path.iterdir()] == ["b.pt"]  # no temp file left behind


def test_script_module_survives_a_stale_builtin_id():
    """TorchScript takes any attribute whose id() is in its builtin table for a builtin function;
    ids of freed ops stay there (after torch.export / Inductor ran in the process), so a Conv2d's
    padding list allocated at such an address broke scripting at random (seen once in CI).  Plant
    such an entry on purpose: plain torch.jit.script fails, script_module forgets it and scripts."""
    from torch.jit._builtins import _get_builtin_table

    module = _segmenter_module(0)
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    table = _get_builtin_table()
    planted = id(conv._reversed_padding_repeated_twice)
    assert planted not in table
    table[planted] = "aten::quantize_per_tensor"  # what a freed quantized_decomposed op left behind
    try:
        with pytest.raises(RuntimeError, match="builtin cannot be used as a value"):
            torch.jit.script(module)  # the torch bug itself (pinned torch 2.14.1)
        scripted = script_module(module)
    finally:
        table.pop(planted, None)
    tiles = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for a, b in zip(module(tiles, True), scripted(tiles, True)):
        assert torch.equal(a, b)


def test_content_hash_names_the_model_not_the_file(tmp_path):
    save_bundle(tmp_path / "a.pt", _segmenter_module(0), META)
    save_bundle(tmp_path / "b.pt", script_module(_segmenter_module(0)), META)
    save_bundle(tmp_path / "c.pt", _segmenter_module(1), META)
    h = [read_bundle_metadata(tmp_path / f"{n}.pt")["content_hash"] for n in "abc"]
    assert h[0] == h[1] != h[2]


def test_save_bundle_accepts_any_scripted_module_with_the_signature(tmp_path):
    class Trivial(torch.nn.Module):
        def forward(self, tiles: torch.Tensor, with_scores: bool = False):
            labels = (tiles[:, 0] > 127).to(torch.uint8)
            prob = torch.full((tiles.shape[0], 2), 0.9)
            return labels, torch.empty(0), prob

    save_bundle(tmp_path / "t.pt", Trivial(), dict(META, class_names=["a", "b"], palette=[[0, 0, 0], [1, 1, 1]],
                                                  background_index=255, tile_size=16))
    predict = load_bundle(tmp_path / "t.pt").predictor()
    labels, scores, prob = predict(torch.full((3, 16, 16), 200, dtype=torch.uint8))
    assert labels.shape == (1, 16, 16) and labels.all() and prob.shape == (1, 2)


def test_bad_metadata_is_refused(tmp_path):
    with pytest.raises(BundleError, match=r"missing tile_size"):
        save_bundle(tmp_path / "x.pt", _segmenter_module(), {k: v for k, v in META.items() if k != "tile_size"})
    with pytest.raises(BundleError, match="palette must be"):
        save_bundle(tmp_path / "x.pt", _segmenter_module(), dict(META, palette=[[0, 0, 0]]))
    with pytest.raises(BundleError, match="background_index must be"):
        save_bundle(tmp_path / "x.pt", _segmenter_module(), dict(META, background_index=300))
    with pytest.raises(BundleError, match="input_scale must be a finite number, got nan"):
        save_bundle(tmp_path / "x.pt", _segmenter_module(), dict(META, input_scale=float("nan")))
    with pytest.raises(BundleError, match="mpp must be a positive number or None, got inf"):
        save_bundle(tmp_path / "x.pt", _segmenter_module(), dict(META, mpp=float("inf")))
    assert not os.listdir(tmp_path)


def test_load_errors_name_the_file(tmp_path, bundle_path):
    with pytest.raises(BundleError, match=r"missing\.pt: no such file"):
        load_bundle(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a zip")
    with pytest.raises(BundleError, match=r"text\.pt: not a TorchScript archive"):
        load_bundle(tmp_path / "text.pt")
    plain = script_module(_segmenter_module())
    torch.jit.save(plain, str(tmp_path / "plain.pt"))
    with pytest.raises(BundleError, match=rf"plain\.pt: no {METADATA_FILE}"):
        load_bundle(tmp_path / "plain.pt")
    for name, text, match in (("badjson.pt", "{not json", "invalid wsss_bundle.json"),
                              ("future.pt", json.dumps({"format": "wsss-bundle", "format_version": 99}),
                               "unsupported format_version 99")):
        torch.jit.save(plain, str(tmp_path / name), _extra_files={METADATA_FILE: text})
        with pytest.raises(BundleError, match=match):
            load_bundle(tmp_path / name)
    # a bad device is the device's fault, not the archive's
    with pytest.raises(BundleError, match=r"device must be cpu, cuda or cuda:N, got 'meta'"):
        load_bundle(bundle_path, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(BundleError, match=r"device 'cuda:3' requested but CUDA is not available"):
            load_bundle(bundle_path, device="cuda:3")


def test_bundle_from_another_torch_says_which(tmp_path, bundle_path):
    """A bundle whose code calls an op this torch lacks (as torch 2.14 bundles of older wsss, which
    carried F.interpolate's body, did in 2.11):
    the message names both torch versions."""
    out = tmp_path / "newer.pt"
    with zipfile.ZipFile(bundle_path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/code/__torch__/wsss/models/segmenter.py"):
                assert b"torch.softmax(" in data
                data = data.replace(b"torch.softmax(", b"torch._wsss_op_of_a_future_torch(", 1)
            elif item.filename.endswith("/extra/" + METADATA_FILE):
                data = json.dumps(dict(json.loads(data), torch_version="99.0.0")).encode()
            dst.writestr(item, data)
    with pytest.raises(BundleError, match=r"newer\.pt: not a loadable TorchScript archive: .*saved with torch 99\.0\.0, "
                                          rf"this is torch {re.escape(torch.__version__)}"):
        load_bundle(out)


def test_edited_bundle_fails_hash_check(tmp_path, bundle_path):
    bundle = load_bundle(bundle_path)
    meta = dict(bundle.metadata, gate_eps=0.5)  # claims another eps than the one hashed
    torch.jit.save(bundle.module, str(tmp_path / "edited.pt"), _extra_files={METADATA_FILE: json.dumps(meta)})
    with pytest.raises(BundleError, match="content hash mismatch"):
        load_bundle(tmp_path / "edited.pt")
    assert load_bundle(tmp_path / "edited.pt", verify=False).metadata["gate_eps"] == 0.5


def test_metadata_is_a_plain_zip_entry_for_cpp(bundle_path):
    with zipfile.ZipFile(bundle_path) as zf:
        entry = [n for n in zf.namelist() if n.endswith("extra/" + METADATA_FILE)]
        assert len(entry) == 1
        assert json.loads(zf.read(entry[0]))["class_names"] == META["class_names"]


def test_predictor_float32_equals_module_and_handles_layout(bundle_path):
    bundle = load_bundle(bundle_path)
    tiles = _tiles(3)
    expected = bundle.module(tiles, True)
    predict = bundle.predictor("cpu", "float32")
    got = predict(tiles, with_scores=True)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=2e-5)  # channels_last reorders sums
    torch.testing.assert_close(got[2], expected[2], rtol=1e-4, atol=2e-5)
    assert predict(tiles)[1].numel() == 0
    with pytest.raises(BundleError, match="precision must be one of"):
        bundle.predictor(precision="int8")
    with pytest.raises(BundleError, match=r"tiles must have shape \[N, 3, H, W\]"):
        predict(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_predictor_bfloat16_agrees_with_float32_on_synthetic_tissue(bundle_path):
    from wsss.synthetic import render_tissue
    import numpy as np

    tiles = torch.from_numpy(np.stack([render_tissue(64, 64, seed=s)[0] for s in range(4)])).permute(0, 3, 1, 2)
    bundle = load_bundle(bundle_path)
    ref_labels, _, ref_prob = bundle.predictor(precision="float32")(tiles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "slower than float32" on CPUs without bf16 units
        labels, _, prob = bundle.predictor(precision="bfloat16")(tiles)
    assert labels.dtype == torch.uint8 and prob.dtype == torch.float32
    agreement = (labels == ref_labels).float().mean().item()
    # NB: a random-init tiny network has small logit margins, the worst case for rounding; the
    # precision report in benchmarks/bench_models.py measures the same on larger tiles.
    assert agreement >= 0.95, agreement
    assert (prob - ref_prob).abs().max() < 0.05


def test_predictor_refuses_a_bundle_replaced_since_it_was_loaded(tmp_path, bundle_path):
    """A predictor loads its private copy of the module from the file again: that must be the
    file whose sha256 the run reports, so a bundle replaced or rewritten since is an error."""
    import os
    import shutil

    path = tmp_path / "b.pt"
    shutil.copy(bundle_path, path)
    b = load_bundle(str(path))
    b.predictor("cpu")  # (unchanged: fine)
    shutil.copy(bundle_path, tmp_path / "other.pt")
    os.replace(tmp_path / "other.pt", path)  # same bytes, another file
    with pytest.raises(BundleError, match=r"b\.pt: the file changed on disk after it was loaded"):
        b.predictor("cpu")
    b = load_bundle(str(path))
    os.utime(path, ns=(0, 0))  # rewritten in place
    with pytest.raises(BundleError, match="changed on disk"):
        b.predictor("cpu")
    b = load_bundle(str(path))
    path.unlink()
    with pytest.raises(BundleError, match=r"b\.pt: "):
        b.predictor("cpu")


def _resaved(bundle, path, **edits):
    """``bundle``'s module saved at ``path`` with edited metadata and a content hash that matches
    it (what save_bundle would refuse to write: only the readers' checks stand in the way)."""
    from wsss.bundle import content_hash

    meta = dict(bundle.metadata, **edits)
    meta["content_hash"] = content_hash(bundle.module, meta)
    torch.jit.save(bundle.module, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})
    return path


@pytest.mark.parametrize("edits, message", [
    ({"class_names": "TENEC"}, "class_names must be a non-empty list"),
    ({"class_names": ["A", "B", "C"]}, "class_names has 3 names but the module has 4 classes"),
    ({"class_names": list("ABCDE"), "background_index": 5}, "class_names has 5 names but the module has 4 classes"),
    ({"background_index": 1}, r"background_index must be an int in 4\.\.255 .*got 1"),
    ({"background_index": -1}, "background_index must be .*got -1"),
    ({"background_index": 300}, "background_index must be .*got 300"),
    ({"tile_size": 95.7}, "tile_size must be a positive int .*got 95.7"),
    ({"tile_size": 0}, "tile_size must be a positive int .*got 0"),
    ({"mpp": float("nan")}, "mpp must be a positive number or None, got nan"),
    ({"mpp": -1.0}, "mpp must be a positive number or None, got -1.0"),
    ({"palette": [[1, 2, 3]]}, "palette must be"),
    ({"palette": [[1, 2], [3], [4], [5], [6]]}, "palette must be"),
    ({"palette": [[0, 0, 300]] * 5}, "palette must be"),
    ({"gate_eps": "x"}, "gate_eps must be a finite number"),
])
def test_load_refuses_bad_metadata_even_with_a_matching_hash(tmp_path, bundle_path, edits, message):
    """Metadata is checked when a bundle is read, as when it is saved: a bundle edited by hand
    (hash recomputed) ran with wrong class names, colours or background before."""
    path = _resaved(load_bundle(bundle_path), tmp_path / "edited.pt", **edits)
    with pytest.raises(BundleError, match=r"edited\.pt: .*" + message) as error:
        load_bundle(path)
    assert "\n" not in str(error.value)
    if "module has" not in message:  # (the cheap reader checks every field too)
        with pytest.raises(BundleError, match=message):
            read_bundle_metadata(path)


def test_save_refuses_another_class_count_or_a_module_that_is_no_segmenter(tmp_path):
    with pytest.raises(BundleError, match=r"x\.pt: class_names has 3 names but the module has 4 classes"):
        save_bundle(tmp_path / "x.pt", _segmenter_module(), dict(META, class_names=["a", "b", "c"]))
    with pytest.raises(BundleError, match=r"x\.pt: metadata: background_index must be an int in 4\.\.255"):
        save_bundle(tmp_path / "x.pt", _segmenter_module(), dict(META, background_index=1))
    deeplab = DeepLabV3Plus(4, backbone="resnet50", width=0.0625).eval()
    with pytest.raises(BundleError, match=r"x\.pt: the module is not a wsss inference module \(TissueSegmenter\): "
                                          r".*got forward\(.*DeepLabV3Plus self, Tensor x\) -> Tensor$"):
        save_bundle(tmp_path / "x.pt", deeplab, META)
    assert not os.listdir(tmp_path)


def test_damaged_archives_are_one_error(tmp_path, bundle_path):
    """A flipped byte in a member (bad CRC), a damaged central directory, a cut-short file: one
    BundleError each (zipfile's tracebacks before)."""
    raw = bundle_path.read_bytes()
    with zipfile.ZipFile(bundle_path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/extra/" + METADATA_FILE))
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    crc = bytearray(raw)
    crc[info.header_offset + 30 + name_len + extra_len + 3] ^= 0x01  # inside the stored metadata JSON
    (tmp_path / "crc.pt").write_bytes(bytes(crc))
    cd = bytearray(raw)
    eocd = raw.rfind(b"PK\x05\x06")
    cd[int.from_bytes(raw[eocd + 16:eocd + 20], "little")] = 0  # first central directory entry's signature
    (tmp_path / "cd.pt").write_bytes(bytes(cd))
    (tmp_path / "cut.pt").write_bytes(raw[:len(raw) // 2])
    for name, detail in (("crc", "Bad CRC-32"), ("cd", "Bad magic number"), ("cut", "without its central directory")):
        with pytest.raises(BundleError, match=rf"{name}\.pt: is corrupted or truncated \(.*{detail}") as error:
            load_bundle(tmp_path / f"{name}.pt")
        assert "\n" not in str(error.value)


def test_predictor_refuses_tiles_of_other_dtypes(bundle_path):
    predict = load_bundle(bundle_path).predictor("cpu", "float32")
    for dtype in (torch.int64, torch.int32, torch.bool):
        with pytest.raises(BundleError, match=rf"tiles must be uint8 or floating point \(0\.\.255\), got {dtype}$"):
            predict(torch.zeros(1, 3, 16, 16, dtype=dtype))
    assert predict(torch.zeros(1, 3, 16, 16, dtype=torch.float64))[0].shape == (1, 16, 16)
