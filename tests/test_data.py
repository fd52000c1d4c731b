"""Dataset descriptions and readers: built-ins as METHOD.md, clear DataErrors naming the file."""
import os

import numpy as np
import pytest
from PIL import Image

from wsss.data import (BCSS_WSSS, LUAD_HISTOSEG, DatasetDescription, LabelledPatches, MaskedPatches,
                       PseudoMaskPatches, format_label, get_description, parse_label)
from wsss.errors import DataError


def test_builtins_match_method():
    assert LUAD_HISTOSEG.class_names == ("TE", "NEC", "LYM", "TAS")
    assert LUAD_HISTOSEG.palette == ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255))
    assert LUAD_HISTOSEG.background_index == 4 and not LUAD_HISTOSEG.background_is_tissue
    assert BCSS_WSSS.class_names == ("TUM", "STR", "LYM", "NEC")
    assert BCSS_WSSS.palette == ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255))
    assert BCSS_WSSS.background_is_tissue
    assert get_description("luad") is LUAD_HISTOSEG and get_description("BCSS-WSSS") is BCSS_WSSS


def test_label_parsing():
    assert parse_label("1031280-2300-27920-[1 0 0 1].png", LUAD_HISTOSEG) == [1, 0, 0, 1]
    assert parse_label("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", BCSS_WSSS) == [1, 1, 0, 1]
    assert format_label([1, 0, 0, 1], LUAD_HISTOSEG) == "[1 0 0 1]"
    assert format_label([1, 1, 0, 1], BCSS_WSSS) == "[1101]"
    with pytest.raises(DataError, match=r"x-\[1 0 2 1\]\.png: cannot parse"):
        parse_label("x-[1 0 2 1].png", LUAD_HISTOSEG)
    with pytest.raises(DataError, match=r"nolabel\.png.*no '\[\.\.\.\]'"):
        parse_label("nolabel.png", LUAD_HISTOSEG)
    with pytest.raises(DataError, match="expected 4 digits"):
        parse_label("a-[1 0 1].png", LUAD_HISTOSEG)


def test_description_json_round_trip_and_three_classes(tmp_path):
    d = DatasetDescription(name="cohort3", class_names=("A", "B", "C"),
                           palette=((1, 2, 3), (4, 5, 6), (7, 8, 9), (255, 255, 255)), background_index=3,
                           label_parser="bracket_compact")
    path = str(tmp_path / "d.json")
    d.save_json(path)
    assert DatasetDescription.load_json(path) == d
    assert get_description(path) == d
    assert parse_label("p[101].png", d) == [1, 0, 1]
    with pytest.raises(DataError, match="collides"):
        DatasetDescription(name="x", class_names=("A", "B"), palette=((0, 0, 0),) * 3, background_index=1)
    with pytest.raises(DataError, match="unknown keys"):
        DatasetDescription.from_dict({**d.to_dict(), "colour": 1})
    with pytest.raises(DataError, match="not a built-in"):
        get_description("no-such-dataset")


@pytest.mark.parametrize("change,match", [
    ({"background_index": "4"}, "background_index must be a whole number, got '4'"),
    ({"palette": [0, 1, 2]}, r"palette must be a list of \[r, g, b\] integer triples, got \[0, 1, 2\]"),
    ({"class_names": "ABC"}, "class_names must be a list of names, got 'ABC'"),
    ({"min_object_px": 2.5}, "min_object_px must be a whole number"),
    ({"mpp": "0.5"}, "mpp must be a positive number of microns per pixel"),
    ({"mpp": float("nan")}, "mpp must be a positive number"),
    # (these were accepted: a truthy string, names str()-ed to "1", "None", one table row for two classes)
    ({"background_is_tissue": "false"}, "background_is_tissue must be true or false, got 'false'"),
    ({"class_names": [1, None, 3.5]}, "class_names must be non-empty strings"),
    ({"class_names": ["A", " ", "C"]}, "class_names must be non-empty strings"),
    ({"class_names": ["A", "A", "C"]}, r"class_names must be distinct \(repeated: A\)"),
    ({"name": ["x"]}, r"name must be a non-empty string, got \['x'\]"),
    ({"white_threshold": -5}, "white_threshold must be a gray level in 0..255, got -5"),
    ({"white_threshold": 256}, "white_threshold must be a gray level in 0..255, got 256"),
    ({"min_object_px": -1}, "min_object_px must be 0 or more pixels, got -1"),
    ({"background_index": -1}, r"background_index must be in \[3, 255\], got -1"),
])
def test_malformed_description_json_is_one_message(tmp_path, change, match):
    """A hand-written dataset.json with a value of the wrong type or range: DataError naming the
    file and the key (it was a TypeError from deep inside the checks, or silently accepted)."""
    d = {"name": "mine", "class_names": ["A", "B", "C"], "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9], [9, 9, 9]],
         "background_index": 3}
    d.update(change)
    path = tmp_path / "d.json"
    path.write_text(__import__("json").dumps(d))
    with pytest.raises(DataError, match=match) as info:
        get_description(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_description_json_is_utf8(tmp_path):
    """dataset.json is read as UTF-8 (as save_json writes it, a BOM allowed); bytes that are not
    UTF-8 are one DataError naming the file, not a UnicodeDecodeError traceback."""
    d = DatasetDescription(name="kohorte", class_names=("Tümor", "Stroma ä"),
                           palette=((1, 2, 3), (4, 5, 6), (255, 255, 255)), background_index=2)
    path = tmp_path / "dataset.json"
    path.write_bytes(b"\xef\xbb\xbf" + __import__("json").dumps(d.to_dict(), ensure_ascii=False).encode("utf-8"))
    assert get_description("auto", str(tmp_path)) == d
    path.write_bytes(path.read_bytes().replace("Tümor".encode("utf-8"), b"T\xfcmor"))  # Latin-1
    with pytest.raises(DataError, match=r"dataset\.json: not UTF-8 text"):
        get_description("auto", str(tmp_path))


def _png(path, array, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)


def _dataset(tmp_path, mask_value=1, mask_size=(16, 16)):
    rgb = np.full((16, 16, 3), 128, np.uint8)
    _png(str(tmp_path / "train" / "a-[1 0 0 1].png"), rgb)
    _png(str(tmp_path / "val" / "img" / "v.png"), rgb)
    _png(str(tmp_path / "val" / "mask" / "v.png"), np.full(mask_size, mask_value, np.uint8), LUAD_HISTOSEG.palette_flat())


def test_readers(tmp_path):
    _dataset(tmp_path)
    train = LabelledPatches(str(tmp_path), LUAD_HISTOSEG)
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and item["label"].tolist() == [1, 0, 0, 1]
    val = MaskedPatches(str(tmp_path), LUAD_HISTOSEG, "val")
    assert val[0]["mask"].unique().tolist() == [1]


def test_bad_data_errors_name_the_file(tmp_path):
    _dataset(tmp_path / "big", mask_size=(12, 16))
    with pytest.raises(DataError, match=r"v\.png: mask size 16x12 does not match"):
        MaskedPatches(str(tmp_path / "big"), LUAD_HISTOSEG, "val").validate()
    _dataset(tmp_path / "idx", mask_value=7)
    with pytest.raises(DataError, match=r"v\.png: palette index 7 out of range"):
        MaskedPatches(str(tmp_path / "idx"), LUAD_HISTOSEG, "val")[0]
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(DataError, match="empty split"):
        LabelledPatches(str(tmp_path / "empty"), LUAD_HISTOSEG)
    _dataset(tmp_path / "lab")
    _png(str(tmp_path / "lab" / "train" / "bad-[1 x 0 1].png"), np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"bad-\[1 x 0 1\]\.png"):
        LabelledPatches(str(tmp_path / "lab"), LUAD_HISTOSEG)
    with pytest.raises(DataError, match="no 'test' split"):
        MaskedPatches(str(tmp_path / "lab"), LUAD_HISTOSEG, "test")
    with pytest.raises(DataError, match="does not exist"):
        PseudoMaskPatches(str(tmp_path / "idx"), str(tmp_path / "nope"), ["bn7"], LUAD_HISTOSEG)


@pytest.mark.parametrize("folder,other", [("img", "a.jpg"), ("mask", "a.tif")])
def test_two_files_with_one_stem_are_refused(tmp_path, folder, other):
    """a.png + a.jpg images (both scored against mask a.png), or a.png + a.tif masks (the later
    one won silently): a DataError naming both files."""
    rgb = np.full((16, 16, 3), 128, np.uint8)
    _png(str(tmp_path / "val" / "img" / "a.png"), rgb)
    _png(str(tmp_path / "val" / "mask" / "a.png"), np.ones((16, 16), np.uint8), LUAD_HISTOSEG.palette_flat())
    _png(str(tmp_path / "val" / folder / other), np.ones((16, 16), np.uint8) if folder == "mask" else rgb)
    with pytest.raises(DataError, match="two files with the stem 'a'") as info:
        MaskedPatches(str(tmp_path), LUAD_HISTOSEG, "val")
    assert "a.png" in str(info.value) and other in str(info.value)
    _png(str(tmp_path / "train" / "p-[1 0 0 1].png"), rgb)
    _png(str(tmp_path / "train" / "p-[1 0 0 1].jpg"), rgb)
    with pytest.raises(DataError, match=r"two files with the stem 'p-\[1 0 0 1\]'"):
        LabelledPatches(str(tmp_path), LUAD_HISTOSEG)


def test_a_label_naming_no_class_is_refused():
    """[0 0 0 0] says the patch holds no tissue class: every training patch holds one (METHOD.md);
    it was accepted and its pseudo masks painted all tissue class 0."""
    with pytest.raises(DataError, match=r"x-\[0 0 0 0\]\.png: the patch label \[0 0 0 0\] names no class") as info:
        parse_label("x-[0 0 0 0].png", LUAD_HISTOSEG)
    assert "TE, NEC, LYM, TAS" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"names no class"):
        parse_label("TCGA-x_MPP-0.2500+0[0000].png", BCSS_WSSS)
    assert parse_label("x-[0 0 0 1].png", LUAD_HISTOSEG) == [0, 0, 0, 1]


def _bomb_png(path, width=20000, height=20000):
    """A small PNG whose header claims width x height pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 601)) + chunk(b"IEND", b""))


def test_a_png_claiming_a_huge_size_is_one_message(tmp_path):
    """PIL's DecompressionBombError is no OSError: it escaped as a traceback (exit 1)."""
    from wsss.data import read_mask, read_rgb

    _dataset(tmp_path)
    bomb = str(tmp_path / "train" / "b-[1 0 0 0].png")
    _bomb_png(bomb)
    train = LabelledPatches(str(tmp_path), LUAD_HISTOSEG)
    with pytest.raises(DataError, match=r"b-\[1 0 0 0\]\.png: cannot read the image: its header claims 400000000 "
                                        r"pixels, over PIL's limit") as info:
        train[train.names.index("b-[1 0 0 0].png")]
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"b-\[1 0 0 0\]\.png: cannot read the mask: its header claims"):
        read_mask(bomb, LUAD_HISTOSEG)
    with pytest.raises(DataError, match="cannot read the image"):
        read_rgb(bomb)


def test_image_modes_are_read_as_what_they_are(tmp_path):
    """16-bit grey became all white (PIL's I;16 -> RGB clips at 255): now scaled to 8 bits (the
    high byte, as PIL reads 16-bit RGB).  Modes with no lossless 8-bit RGB reading are refused
    by name; grey, palette and RGBA (alpha dropped) read as before."""
    from wsss.data import read_rgb

    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode == "I;16"
    rgb = read_rgb(str(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb, np.repeat(grey[..., None], 3, axis=2))
    Image.fromarray(grey).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "g8.png")), rgb)
    colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([colour, np.full((16, 16), 7, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "rgba.png")), colour)
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(grey.astype(np.int32) * 1000).save(tmp_path / "i.tif")
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "c.jpg")
    for name, what in (("f.tif", "32-bit float grey"), ("i.tif", "32-bit integer grey"), ("c.jpg", "CMYK colour")):
        with pytest.raises(DataError, match=rf"{name}: cannot use the image: its pixels are {what} .*save the "
                                            rf"patch as 8-bit RGB") as info:
            read_rgb(str(tmp_path / name))
        assert "\n" not in str(info.value)
