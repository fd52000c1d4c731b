"""The synthetic tissue generator: deterministic, window-independent, texture-defined classes; slides."""
import os

import numpy as np
import pytest
from PIL import Image

from wsss.synthetic import (render_labels_window, render_tissue, render_window, truth_path_for,
                            write_patch_dataset, write_synthetic_slide)


def test_render_is_deterministic_and_seeded():
    a_rgb, a_lab = render_tissue(80, 96, seed=5)
    b_rgb, b_lab = render_tissue(80, 96, seed=5)
    c_rgb, _ = render_tissue(80, 96, seed=6)
    assert a_rgb.shape == (80, 96, 3) and a_rgb.dtype == np.uint8
    assert a_lab.shape == (80, 96) and a_lab.dtype == np.uint8
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_rgb, c_rgb)


def test_windows_agree_with_the_whole_plane():
    rgb, lab = render_window(0, 0, 150, 170, seed=2, mpp=0.5)
    part_rgb, part_lab = render_window(37, 61, 53, 90, seed=2, mpp=0.5)
    assert np.array_equal(part_rgb, rgb[61:114, 37:127])
    assert np.array_equal(part_lab, lab[61:114, 37:127])
    assert np.array_equal(render_labels_window(37, 61, 53, 90, seed=2, mpp=0.5), part_lab)


def test_labels_cover_all_classes_and_background_is_white():
    rgb, lab = render_tissue(512, 512, seed=3)
    assert set(np.unique(lab).tolist()) <= {0, 1, 2, 3, 4}
    counts = np.bincount(lab.ravel(), minlength=5)
    assert (counts[:4] > 0).all(), counts
    bg = rgb[lab == 4].astype(float)
    if len(bg):
        assert bg.mean() > 230
    tissue_gray = rgb[lab < 4].astype(float).mean(axis=1)
    assert np.median(tissue_gray) < 200


def test_class_colours_overlap_but_textures_differ():
    rgb, lab = render_tissue(512, 512, seed=4)
    gray = rgb.astype(float).mean(axis=2)
    stats = {}
    for k in range(4):
        m = lab == k
        if m.sum() < 2000:
            continue
        stats[k] = (gray[m].mean(), gray[m].std())
    # Each class' colour range overlaps another class' range (means within 2 std of each other).
    for k, (mean, std) in stats.items():
        assert any(abs(mean - m2) < 2 * max(std, s2) for j, (m2, s2) in stats.items() if j != k)
    # Lymphocytes (dense dark nuclei) are far more textured than stroma.
    if 2 in stats and 3 in stats:
        assert stats[2][1] > stats[3][1]


def test_num_classes_and_errors():
    _, lab = render_tissue(64, 64, seed=0, num_classes=3)
    assert lab.max() <= 3
    with pytest.raises(ValueError, match="num_classes"):
        render_tissue(8, 8, seed=0, num_classes=9)


def test_patch_dataset_layout(tmp_path):
    from wsss.data import LabelledPatches, MaskedPatches, get_description, parse_label

    counts = write_patch_dataset(tmp_path, n_train=6, n_val=2, n_test=3, patch=48, seed=1)
    assert counts == {"train": 6, "val": 2, "test": 3}
    names = sorted(os.listdir(tmp_path / "train"))
    assert len(names) == 6 and all(n.endswith("].png") and "-[" in n for n in names)
    desc = get_description("auto", str(tmp_path))
    assert desc.background_index == 4 and desc.class_names == ("TE", "NEC", "LYM", "TAS")
    for n in names:
        label = parse_label(n, desc)
        truth = np.asarray(Image.open(tmp_path / "train_truth" / n))
        present = [int((truth == k).mean() >= 0.02) for k in range(4)]
        assert label == present
    assert len(LabelledPatches(str(tmp_path), desc)) == 6
    test = MaskedPatches(str(tmp_path), desc, "test")
    item = test[0]
    assert item["image"].shape == (3, 48, 48) and item["mask"].shape == (48, 48)
    assert Image.open(tmp_path / "test" / "mask" / os.listdir(tmp_path / "test" / "mask")[0]).mode == "P"
    # Deterministic: a second write gives identical files.
    write_patch_dataset(tmp_path / "again", n_train=6, n_val=2, n_test=3, patch=48, seed=1)
    for n in names:
        assert (tmp_path / "train" / n).read_bytes() == (tmp_path / "again" / "train" / n).read_bytes()


def test_synthetic_slide_pyramid_opens_in_openslide(tmp_path):
    import tifffile

    path = str(tmp_path / "slide.tif")
    truth = write_synthetic_slide(path, 700, 530, seed=3, mpp=0.5, tile_size=128)
    assert truth == truth_path_for(path) and os.path.isfile(truth)
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n or n.startswith(".")]
    with tifffile.TiffFile(path) as tif:
        shapes = [p.shape for p in tif.pages]
        assert shapes[0] == (530, 700, 3)
        assert len(shapes) >= 3 and shapes[1] == (265, 350, 3)
        assert all(p.is_tiled for p in tif.pages)
        level0 = tif.pages[0].asarray()
    ref_rgb, ref_lab = render_window(0, 0, 530, 700, seed=3, mpp=0.5)
    assert np.abs(level0.astype(int) - ref_rgb.astype(int)).mean() < 8  # JPEG
    assert np.array_equal(tifffile.imread(truth), ref_lab)
    import openslide
    slide = openslide.OpenSlide(path)
    assert slide.level_count == len(shapes)
    assert slide.dimensions == (700, 530)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
    region = np.asarray(slide.read_region((100, 50), 1, (60, 40)).convert("RGB")).astype(int)
    # Level 1 is the 2x box mean of level 0 (read_region takes level-0 coordinates).
    ref1 = ref_rgb[50:130, 100:220].reshape(40, 2, 60, 2, 3).mean(axis=(1, 3))
    assert np.abs(region - ref1).mean() < 8


def test_slide_lossless_is_exact(tmp_path):
    import tifffile

    path = str(tmp_path / "s.tif")
    write_synthetic_slide(path, 300, 200, seed=1, mpp=1.0, tile_size=64, compression="zlib")
    ref, _ = render_window(0, 0, 200, 300, seed=1, mpp=1.0)
    with tifffile.TiffFile(path) as tif:
        assert np.array_equal(tif.pages[0].asarray(), ref)


@pytest.mark.parametrize("fail_in", ["slide", "truth"])
def test_a_failed_slide_write_leaves_nothing(tmp_path, monkeypatch, fail_in):
    """Interrupted while the slide or its truth is written: neither file, nor any temporary, is
    left (an earlier slide at that path stays as it was)."""
    import wsss.synthetic.slide as slide_module

    path = tmp_path / "s.tif"
    path.write_bytes(b"an earlier slide")
    target = "render_window" if fail_in == "slide" else "_truth_tiles"
    real = getattr(slide_module, target)

    def fail_later(*a, **k):
        if target == "_truth_tiles":
            raise KeyboardInterrupt
        fail_later.calls += 1
        if fail_later.calls > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    fail_later.calls = 0
    monkeypatch.setattr(slide_module, target, fail_later)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_slide(str(path), 300, 200, seed=1, mpp=1.0, tile_size=64)
    assert sorted(os.listdir(tmp_path)) == ["s.tif"] and path.read_bytes() == b"an earlier slide"


def test_patch_dataset_refuses_what_no_patch_can_meet(tmp_path):
    """A patch that never has enough tissue was kept anyway (its 1000th try): now an error."""
    with pytest.raises(ValueError, match="in 1000 tries has 101% tissue"):
        write_patch_dataset(tmp_path, n_train=1, n_val=0, n_test=0, patch=32, min_tissue=1.01)
