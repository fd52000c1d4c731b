"""Bundles load in older torch: the models resize with wsss.models.resize.resize_bilinear, which
scripts to the one aten op F.interpolate calls (bit-identical), so no archive carries
F.interpolate's body (torch 2.14's calls aten::_upsample_lanczos2d_aa, unknown to torch 2.11);
tools/resave_bundle.py re-saves old bundles with the same weights, metadata and outputs."""
from __future__ import annotations

import importlib.util
import io
import warnings
import zipfile
from unittest import mock
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F

from wsss.bundle import load_bundle, save_bundle, script_module
from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter
from wsss.models import segmenter as segmenter_module
from wsss.models.resize import resize_bilinear

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "wsss" / "assets" / "demo_bundle.pt"
TOOL = ROOT / "tools" / "resave_bundle.py"
META = {
    "class_names": ["TE", "NEC", "LYM", "TAS"],
    "palette": [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 255, 255]],
    "background_index": 4,
    "tile_size": 48,
    "config": {"classifier": {"width": 0.0625}, "segmenter": {"backbone": "resnet50", "width": 0.0625}},
}
# up, down, mixed, unchanged, to 1 pixel, from 1 pixel (odd sizes: align_corners matters)
SIZES = [((5, 7), (21, 30)), ((33, 29), (8, 11)), ((12, 12), (25, 6)), ((9, 13), (9, 13)), ((6, 6), (1, 1)),
         ((1, 1), (7, 5))]
_SCRIPTED = torch.jit.script(resize_bilinear)


def _interpolate(x: torch.Tensor, size: List[int], align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=(size[0], size[1]), mode="bilinear", align_corners=align_corners)


_SCRIPTED_INTERPOLATE = torch.jit.script(_interpolate)


def _upsample_schemas(graph) -> List[str]:
    torch._C._jit_pass_inline(graph)
    return [str(n.schema()) for n in graph.findAllNodes("aten::upsample_bilinear2d")]


def test_resize_bilinear_scripts_to_the_op_and_overload_of_scripted_interpolate():
    ours = _upsample_schemas(_SCRIPTED.graph.copy())
    theirs = _upsample_schemas(_SCRIPTED_INTERPOLATE.graph.copy())
    assert len(ours) == 1 and ours[0].startswith("aten::upsample_bilinear2d.vec(")
    assert ours[0] in theirs  # F.interpolate's body also has the other modes' ops
    assert "lanczos" not in _SCRIPTED.code and "interpolate" not in _SCRIPTED.code


def _check_bit_identical(device: str, autocast_dtype=None) -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for (h, w), size in SIZES:
            for channels_last in (False, True):
                x = torch.randn(2, 3, h, w, generator=g).to(device=device, dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for align_corners in (True, False):
                    with torch.autocast(device.split(":")[0], dtype=autocast_dtype or torch.bfloat16,
                                        enabled=autocast_dtype is not None):
                        expected = _interpolate(x, list(size), align_corners)
                        got = {"eager": resize_bilinear(x, list(size), align_corners),
                               "scripted": _SCRIPTED(x, list(size), align_corners),
                               "scripted F.interpolate": _SCRIPTED_INTERPOLATE(x, list(size), align_corners)}
                    for how, y in got.items():
                        assert y.dtype == expected.dtype and y.shape == expected.shape, (how, dtype, size)
                        assert torch.equal(y, expected), (how, dtype, (h, w), size, channels_last, align_corners)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16, torch.float16], ids=["plain", "autocast-bf16",
                                                                                    "autocast-fp16"])
def test_resize_bilinear_is_bit_identical_to_interpolate_on_cpu(autocast_dtype):
    _check_bit_identical("cpu", autocast_dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16, torch.float16], ids=["plain", "autocast-bf16",
                                                                                    "autocast-fp16"])
def test_resize_bilinear_is_bit_identical_to_interpolate_on_cuda(autocast_dtype):
    _check_bit_identical("cuda", autocast_dtype)


def test_resize_bilinear_keeps_autograd():
    x = torch.randn(1, 2, 5, 6, requires_grad=True)
    (resize_bilinear(x, [9, 4], True) * torch.arange(36.0).reshape(1, 1, 9, 4)).sum().backward()
    g_ours = x.grad.clone()
    x.grad = None
    (_SCRIPTED(x, [9, 4], True) * torch.arange(36.0).reshape(1, 1, 9, 4)).sum().backward()
    assert torch.equal(x.grad, g_ours)


# ----------------------------------------------------------------------------- archives


def _archive_code(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n).decode("utf-8", "replace") for n in zf.namelist()
                if "/code/" in n and n.endswith(".py")}


def _assert_portable(code: dict, what: str) -> None:
    assert code, f"{what}: no code files in the archive"
    for name, text in code.items():
        assert "lanczos" not in text, f"{what}: {name} has lanczos code"
        assert "def interpolate(" not in text, f"{what}: {name} carries F.interpolate's body"
        assert "functional.interpolate" not in text and "interpolate(" not in text, f"{what}: {name} calls interpolate"
    assert any("torch.upsample_bilinear2d(" in text for text in code.values()), what


def _small(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "classifier":
        return ResNet38Classifier(4, width=0.0625).eval()
    if kind == "segmenter":
        return DeepLabV3Plus(4, backbone="resnet50", width=0.0625).eval()
    return TissueSegmenter(_small("classifier", seed), _small("segmenter", seed)).eval()


def test_fresh_bundle_archive_has_no_interpolate_or_lanczos_code(tmp_path):
    path = tmp_path / "model.pt"
    save_bundle(path, _small("bundle"), META)
    _assert_portable(_archive_code(path.read_bytes()), "bundle")


@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
def test_scripted_networks_have_no_lanczos_code(kind):
    buf = io.BytesIO()
    torch.jit.save(script_module(_small(kind)), buf)
    code = _archive_code(buf.getvalue())
    if kind == "segmenter":
        _assert_portable(code, kind)
    else:  # the classifier resizes nothing
        assert not any("lanczos" in t or "interpolate" in t for t in code.values())


def test_shipped_demo_bundle_has_no_lanczos_code():
    _assert_portable(_archive_code(DEMO_BUNDLE.read_bytes()), "demo bundle")


# ----------------------------------------------------------------------------- tools/resave_bundle.py


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("resave_bundle", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _interpolate_resize(x: torch.Tensor, size_hw: List[int], align_corners: bool) -> torch.Tensor:
    """The resize older wsss scripted: F.interpolate, whose body (lanczos branch and all) the
    archive then carries."""
    return F.interpolate(x, size=(size_hw[0], size_hw[1]), mode="bilinear", align_corners=align_corners)


class _OldStyleSegmenter(TissueSegmenter):
    """TissueSegmenter as older wsss saved it: a class of its own, so that TorchScript compiles
    its forward afresh, while ``_old_style_bundle`` has it resize with F.interpolate."""


def _old_style_bundle(path: Path) -> None:
    torch.manual_seed(3)
    module = _OldStyleSegmenter(ResNet38Classifier(4, width=0.0625),
                                DeepLabV3Plus(4, backbone="resnet50", width=0.0625))
    with mock.patch.object(segmenter_module, "resize_bilinear", _interpolate_resize):
        save_bundle(path, module.eval(), META)


def test_resave_keeps_weights_metadata_and_outputs_and_drops_lanczos(tool, tmp_path, capsys):
    old_path, new_path = tmp_path / "old.pt", tmp_path / "new.pt"
    _old_style_bundle(old_path)
    old_code = _archive_code(old_path.read_bytes())
    assert any("lanczos" in t for t in old_code.values())  # else this test tests nothing
    assert tool.main([str(old_path), "-o", str(new_path), "--tiles", "2"]) == 0
    assert "content_hash" in capsys.readouterr().out
    _assert_portable(_archive_code(new_path.read_bytes()), "re-saved bundle")
    old, new = load_bundle(old_path), load_bundle(new_path)
    assert new.metadata == old.metadata  # content_hash included
    tiles = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    for a, b in zip(old.module(tiles, True), new.module(tiles, True)):
        assert torch.equal(a, b)


def test_resave_in_place(tool, tmp_path):
    path = tmp_path / "b.pt"
    _old_style_bundle(path)
    before = load_bundle(path)
    assert tool.main([str(path), "--tiles", "1"]) == 0
    after = load_bundle(path)
    assert after.metadata["content_hash"] == before.metadata["content_hash"] and after.sha256 != before.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]  # no temp file left


def test_resave_refuses_when_outputs_differ(tool, tmp_path, capsys, monkeypatch):
    old_path, new_path = tmp_path / "old.pt", tmp_path / "new.pt"
    _old_style_bundle(old_path)
    rebuild = tool.rebuild_module

    def off_by_a_little(scripted, metadata, where):  # same weights (same content hash), other outputs
        module = rebuild(scripted, metadata, where)
        module.input_scale *= 1.01
        return module

    monkeypatch.setattr(tool, "rebuild_module", off_by_a_little)
    assert tool.main([str(old_path), "-o", str(new_path)]) == 1
    err = capsys.readouterr().err
    assert "refused, nothing written" in err and "outputs are not the old ones" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]


def test_resave_refuses_a_config_that_names_another_architecture(tool, tmp_path, capsys):
    path = tmp_path / "b.pt"
    meta = dict(META, config={"segmenter": {"backbone": "resnet101"}})
    save_bundle(path, _small("bundle"), meta)
    assert tool.main([str(path), "-o", str(tmp_path / "new.pt")]) == 1
    assert "config says segmenter backbone 'resnet101'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]
