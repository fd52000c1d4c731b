"""wsss-pseudo-masks and its inputs: a run owns its output folder (no stale masks scored or
trained on), truth masks are checked before the work, a patch label naming no class and a
damaged checkpoint are one clear error naming the file.  Tiny patches and networks only."""
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data import PseudoMaskPatches, get_description, read_mask
from wsss.data.datasets import INCOMPLETE_MARKER, PSEUDO_MASK_MANIFEST
from wsss.errors import BundleError, DataError
from wsss.train import pseudo_masks as pm

LAYERS = ("b4_5", "b5_2", "bn7")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 6-patch synthetic dataset (32 px, with train_truth/), a 3-patch subset of it and a tiny
    (untrained) classifier checkpoint."""
    from wsss.synthetic import write_patch_dataset
    from wsss.train.classifier import build_classifier

    root = tmp_path_factory.mktemp("pm_inputs")
    data = str(root / "data")
    write_patch_dataset(data, n_train=6, n_val=1, n_test=1, patch=32, seed=5)
    sub = str(root / "sub")
    shutil.copytree(data, sub)
    names = sorted(os.listdir(os.path.join(sub, "train")))
    for n in names[3:]:
        os.unlink(os.path.join(sub, "train", n))
        os.unlink(os.path.join(sub, "train_truth", n))  # (only the subset's truth: stale masks had none)
    torch.manual_seed(0)
    ckpt = str(root / "classifier.pt")
    torch.save({"model": build_classifier(4, 1 / 16).state_dict(), "kind": "classifier"}, ckpt)
    return {"data": data, "sub": sub, "ckpt": ckpt, "names": names}


def _run(inputs, data, out, **kw):
    cfg = pm.PseudoMaskConfig(data_root=data, checkpoint=inputs["ckpt"], out_dir=str(out), batch_size=4,
                              progress=False, **kw)
    return pm.generate_pseudo_masks(cfg)


def _pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def test_a_rerun_owns_its_folder_scores_and_leaves_no_stale_masks(inputs, tmp_path):
    """Defect: a second run into one folder (fewer patches, other --layers) scored the first
    run's masks too (8-patch scores for a 4-patch run), failed on a stale mask's missing truth
    after writing everything, and left stale masks and layer folders for wsss-train-seg."""
    data, sub = inputs["data"], inputs["sub"]
    description = get_description("auto", data)
    out = tmp_path / "pm"
    _run(inputs, data, out, truth_dir=os.path.join(data, "train_truth"))
    assert _pngs(out / "bn7") == [os.path.splitext(n)[0] + ".png" for n in inputs["names"]]
    # (the subset's truth folder holds only its 3 masks: the stale ones had none)
    result = _run(inputs, sub, out, truth_dir=os.path.join(sub, "train_truth"))
    assert result["patches"] == 3
    for layer in LAYERS:
        assert _pngs(out / layer) == inputs["names"][:3]  # the other 3 are gone
    # the scores are of this run's 3 masks only, the same as scoring a folder of just those
    fresh = tmp_path / "fresh"
    _run(inputs, sub, fresh)
    expected = pm.score_pseudo_masks(str(fresh), os.path.join(sub, "train_truth"), description, LAYERS)
    assert repr(result["scores"]) == repr(expected)  # (repr: nan == nan)
    assert 0 < result["scores"]["bn7"]["pixels"] <= 3 * 32 * 32
    # wsss-train-seg on the full dataset with the subset's masks: one message, not stale masks
    with pytest.raises(DataError, match=r"wrote no mask for .*train.*\.png: run wsss-pseudo-masks on this dataset"):
        PseudoMaskPatches(data, str(out), LAYERS, description)
    PseudoMaskPatches(sub, str(out), LAYERS, description)
    # a run with fewer --layers removes the other layers' folders (and their masks)
    (out / "b4_5" / "notes.txt").write_text("mine")  # not wsss's: kept, and so is its folder
    _run(inputs, sub, out, layers=("bn7",))
    assert not (out / "b5_2").exists() and (out / "b4_5").is_dir()
    assert os.listdir(out / "b4_5") == ["notes.txt"]
    assert not (out / INCOMPLETE_MARKER).exists() and (out / PSEUDO_MASK_MANIFEST).is_file()
    with pytest.raises(DataError, match=r"the last wsss-pseudo-masks run into .*pm wrote the layers bn7, not b4_5"):
        PseudoMaskPatches(sub, str(out), LAYERS, description)
    assert len(PseudoMaskPatches(sub, str(out), ["bn7"], description)) == 3


def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def test_a_rerun_that_fails_partway_leaves_the_earlier_masks_as_they_were(inputs, tmp_path, monkeypatch):
    """Defect: a rerun into a finished run's folder removed that run's extra masks and overwrote
    its masks one by one as it went, so a rerun that failed partway (a full disk, Ctrl-C, a bad
    patch) lost the earlier result: the folder was left marked incomplete, refused by
    wsss-train-seg until a rerun finished.  Masks are now written into a hidden staging folder and
    replace the earlier ones only once all are written."""
    data, sub = inputs["data"], inputs["sub"]
    description = get_description("auto", data)
    out = tmp_path / "pm"
    _run(inputs, data, out)
    before = _snapshot(out)
    written = []

    def failing_save_png(path, array, palette=None):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path)
        save_png(path, array, palette)

    save_png = pm.save_png
    monkeypatch.setattr(pm, "save_png", failing_save_png)
    with pytest.raises(OSError, match="No space left"):
        _run(inputs, sub, out, layers=("bn7",))
    assert len(written) == 2 and all(pm.STAGING_DIR in p for p in written)
    assert _snapshot(out) == before  # every mask, the manifest, no marker, no staging folder
    assert len(PseudoMaskPatches(data, str(out), LAYERS, description)) == 6
    # a staging folder left by a run killed hard is not read, and the next run removes it
    monkeypatch.setattr(pm, "save_png", save_png)
    (out / pm.STAGING_DIR / "bn7").mkdir(parents=True)
    (out / pm.STAGING_DIR / "bn7" / inputs["names"][0]).write_bytes(b"half a mask")
    assert len(PseudoMaskPatches(data, str(out), LAYERS, description)) == 6
    _run(inputs, sub, out, layers=("bn7",))
    assert not (out / pm.STAGING_DIR).exists() and not (out / INCOMPLETE_MARKER).exists()
    assert _pngs(out / "bn7") == inputs["names"][:3] and not (out / "b4_5").exists()
    fresh = tmp_path / "fresh"
    _run(inputs, sub, fresh, layers=("bn7",))
    assert _snapshot(out) == _snapshot(fresh)


def test_a_folder_wsss_did_not_mark_loses_nothing_but_its_stale_masks_are_not_read(inputs, tmp_path):
    """A folder without wsss's marker or manifest (masks of an older wsss, or a user's): nothing
    there is deleted, and the manifest keeps its other masks out of the scores and training."""
    data, sub = inputs["data"], inputs["sub"]
    description = get_description("auto", data)
    out = tmp_path / "pm"
    _run(inputs, data, out)
    for name in (PSEUDO_MASK_MANIFEST,):
        os.unlink(out / name)  # (as an older wsss left it)
    _run(inputs, sub, out, layers=("bn7",))
    assert _pngs(out / "bn7") == sorted(os.path.splitext(n)[0] + ".png" for n in inputs["names"])  # all kept
    assert len(_pngs(out / "b4_5")) == 6
    scores = pm.score_pseudo_masks(str(out), os.path.join(sub, "train_truth"), description, ("bn7",))
    assert scores["bn7"]["pixels"] <= 3 * 32 * 32  # the manifest's 3 masks, not the folder's 6
    with pytest.raises(DataError, match="wrote no mask for"):
        PseudoMaskPatches(data, str(out), ["bn7"], description)
    with pytest.raises(DataError, match="wrote the layers bn7, not b4_5"):
        PseudoMaskPatches(sub, str(out), LAYERS, description)


def test_truth_masks_of_another_size_are_refused_before_the_work(inputs, tmp_path, capsys):
    """Defect: truth masks of another size ended in 'ValueError: truth and prediction must have
    the same number of pixels' (exit 1) after every mask was written."""
    from wsss.cli.pseudo_masks import main

    data = inputs["data"]
    small = tmp_path / "truth_small"
    small.mkdir()
    for n in os.listdir(os.path.join(data, "train_truth")):
        with Image.open(os.path.join(data, "train_truth", n)) as img:
            img.crop((0, 0, 16, 16)).save(small / n)
    out = tmp_path / "pm"
    assert main([data, "--classifier", inputs["ckpt"], "--out", str(out), "--truth", str(small), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{small / inputs['names'][0]}: truth mask size 16x16 does not match its image" in err and "(32x32)" in err
    assert not out.exists()  # nothing written
    # scoring a folder by hand names both files and sizes instead of a ValueError
    _run(inputs, data, out)
    description = get_description("auto", data)
    with pytest.raises(DataError, match=r"truth mask size 16x16 does not match the pseudo mask .* \(32x32\)"):
        pm.score_pseudo_masks(str(out), str(small), description, ("bn7",))
    # a truth folder lacking a mask of this dataset: refused up front too
    os.unlink(small / inputs["names"][0])
    with pytest.raises(DataError, match=r"no truth mask .*truth_small"):
        _run(inputs, data, tmp_path / "pm2", truth_dir=str(small))
    assert not (tmp_path / "pm2").exists()


def test_a_label_naming_no_class_is_refused_before_the_work(inputs, tmp_path, capsys):
    """Defect: '[0 0 0 0]' labels were accepted and their pseudo masks painted all tissue class 0."""
    from wsss.cli.pseudo_masks import main

    zero = tmp_path / "zero"
    shutil.copytree(inputs["data"], zero)
    first = sorted(os.listdir(zero / "train"))[0]
    renamed = first[:first.rindex("[")] + "[0 0 0 0].png"
    os.rename(zero / "train" / first, zero / "train" / renamed)
    out = tmp_path / "pm"
    assert main([str(zero), "--classifier", inputs["ckpt"], "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{zero / 'train' / renamed}: the patch label [0 0 0 0] names no class" in err
    assert not out.exists()


def _flip_inside_largest_tensor(src, dst):
    raw = bytearray(open(src, "rb").read())
    with zipfile.ZipFile(src) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    open(dst, "wb").write(bytes(raw))
    return info.filename.split("/", 1)[1]


def test_a_bit_flipped_checkpoint_is_refused(inputs, tmp_path, capsys):
    """Defect: torch.load does not check the zip CRCs, so a checkpoint with a flipped bit loaded
    silently with other weights."""
    from wsss.cli.pseudo_masks import main
    from wsss.models.checkpoints import load_classifier_checkpoint

    bad = tmp_path / "flipped.pt"
    member = _flip_inside_largest_tensor(inputs["ckpt"], bad)
    with pytest.raises(BundleError, match=rf"flipped\.pt: is corrupted: the bytes of its entry {member} do not "
                                          r"match their stored checksum \(CRC-32\)") as error:
        load_classifier_checkpoint(bad)
    assert "\n" not in str(error.value)
    out = tmp_path / "pm"
    assert main([inputs["data"], "--classifier", str(bad), "--out", str(out), "--quiet"]) == 2
    assert "is corrupted" in capsys.readouterr().err and not out.exists()
    load_classifier_checkpoint(inputs["ckpt"])  # (the intact file still loads)


@pytest.mark.parametrize("content,looks", [
    (b"hello\nworld\n", r"the file is text, starting 'hello'"),
    (b"", r"the file is empty, 0 bytes"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", r"the file is text, starting '<!DOCTYPE.*a web page"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), r"the file is a PNG image"),
    (bytes(range(256)) * 4, r"the file is binary data of another kind, starting with the bytes 00 01 02"),
], ids=["text", "empty", "html", "png", "binary"])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, looks):
    """Defect: a text file given as a checkpoint said 'not a PyTorch checkpoint (101)' (a pickle
    opcode number)."""
    from wsss.models.checkpoints import load_classifier_checkpoint

    path = tmp_path / "c.pt"
    path.write_bytes(content)
    with pytest.raises(BundleError, match=rf"c\.pt: not a PyTorch checkpoint \({looks}") as error:
        load_classifier_checkpoint(path)
    assert "\n" not in str(error.value) and "(101)" not in str(error.value)


def test_an_unreadable_image_stops_the_run_before_the_folder_is_touched(inputs, tmp_path):
    """Image headers are checked up front (a PNG claiming 20000x20000 px was a
    DecompressionBombError traceback from the middle of the run)."""
    import struct
    import zlib

    bomb = tmp_path / "bomb"
    shutil.copytree(inputs["data"], bomb)
    last = sorted(os.listdir(bomb / "train"))[-1]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)

    (bomb / "train" / last).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                                        + chunk(b"IDAT", zlib.compress(b"\0" * 601)) + chunk(b"IEND", b""))
    out = tmp_path / "pm"
    with pytest.raises(DataError, match=rf"{last[:10]}.*\.png: cannot read the image: its header claims 400000000 pixels"):
        _run(inputs, str(bomb), out)
    assert not out.exists()
