"""wsss.slide: readers (OpenSlide, tifffile), resolution planning, tissue detection, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsss.errors import SlideError
from wsss.slide import (SlideView, TissueMask, TiffSlideReader, detect_tissue, load_tissue_mask, open_slide,
                        plan_scale)

from runner_kit import REAL_SLIDE  # noqa: E402
needs_real = pytest.mark.skipif(not REAL_SLIDE.is_file(), reason=f"real test slide absent: {REAL_SLIDE}")


def pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3], every pixel distinct enough to catch any offset error."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([(xx * 7 + yy * 3) % 251, (yy * 5 + xx) % 253, rng.integers(0, 256, (h, w))], -1)
    return img.astype(np.uint8)


def write_pyramid(path: Path, levels, *, mpp=0.5, tile=32, compression="zlib", resolution=True) -> None:
    """One page per level (how wsss.synthetic and OpenSlide generic-tiff pyramids are laid out)."""
    with tifffile.TiffWriter(path) as tif:
        for i, img in enumerate(levels):
            kw = {}
            if resolution:
                res = 1e4 / (mpp * levels[0].shape[1] / img.shape[1])
                kw = dict(resolution=(res, res), resolutionunit="CENTIMETER")
            tif.write(img, tile=(tile, tile), photometric="rgb", compression=compression,
                      subfiletype=0 if i == 0 else 1, **kw)


@pytest.fixture
def pyramid(tmp_path):
    l0 = pattern(203, 171)
    l1 = l0[::2, ::2].copy()
    l2 = l1[::2, ::2].copy()
    path = tmp_path / "p.tif"
    write_pyramid(path, [l0, l1, l2])
    return path, [l0, l1, l2]


# --------------------------------------------------------------------------------------
# tifffile reader
# --------------------------------------------------------------------------------------
def test_tiff_reader_levels_and_mpp(pyramid):
    path, levels = pyramid
    with open_slide(path) as r:
        assert r.kind == "tifffile"
        assert r.level_dimensions == [(171, 203), (86, 102), (43, 51)]
        assert r.level_count == 3
        assert r.mpp == pytest.approx(0.5)
        assert r.level_downsamples[1] == pytest.approx(203 / 102)  # (the longer side: the height here)
        assert r.level_tile_sizes[0] == (32, 32)


@pytest.mark.parametrize("x,y,w,h", [(0, 0, 32, 32), (5, 7, 61, 45), (30, 31, 3, 2), (150, 190, 40, 40),
                                     (-10, -3, 20, 20), (0, 0, 171, 203), (170, 202, 1, 1)])
def test_tiff_reader_regions_match_pixels(pyramid, x, y, w, h):
    path, levels = pyramid
    with open_slide(path, reader="tifffile") as r:
        for lvl, img in enumerate(levels):
            got = r.read_region(lvl, x, y, w, h)
            want = np.full((h, w, 3), 255, np.uint8)
            H, W = img.shape[:2]
            ys, xs = slice(max(y, 0), min(y + h, H)), slice(max(x, 0), min(x + w, W))
            if ys.start < ys.stop and xs.start < xs.stop:
                want[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x] = img[ys, xs]
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("reader", ["tifffile", "openslide"])
def test_reads_into_a_buffer_equal_plain_reads(pyramid, reader):
    """read_region / SlideView.read with out= (the runner's batch slot, holding an earlier
    tile's pixels) write and return exactly what a plain read returns: white outside the level."""
    path, _ = pyramid
    with open_slide(path, reader=reader) as r:
        buf = np.zeros((4, 40, 40, 3), np.uint8)
        for k, (x, y) in enumerate([(0, 0), (150, 190), (-10, -3), (60, 70)]):
            buf[k] = 7  # (stale pixels)
            got = r.read_region(0, x, y, 40, 40, out=buf[k])
            assert got is buf[k] or np.shares_memory(got, buf[k])
            np.testing.assert_array_equal(buf[k], r.read_region(0, x, y, 40, 40))
        for mpp in (0.5, 1.5):  # a level read as it is, and one resampled
            v = SlideView(r, plan_scale(r, mpp))
            buf[0] = 7
            v.read(5, 9, 40, 40, out=buf[0])
            np.testing.assert_array_equal(buf[0], v.read(5, 9, 40, 40))


@pytest.mark.parametrize("rows_per_strip", [None, 1000, 7])
def test_large_uncompressed_strips_are_read_in_bands(tmp_path, rows_per_strip):
    """A flat image in one (PIL's way) or a few large uncompressed strips: read in bands of rows,
    never a whole strip per reader thread; small strips are read as they are."""
    img = pattern(1200, 1500, seed=rows_per_strip or 0)
    path = tmp_path / "flat.tif"
    if rows_per_strip is None:
        from PIL import Image

        Image.fromarray(img).save(path)  # one strip, 5.4 MB
    else:
        tifffile.imwrite(path, img, rowsperstrip=rows_per_strip, photometric="rgb")
    rng = np.random.default_rng(0)
    with open_slide(path, reader="tifffile", mpp=0.5) as r:
        bands = r._band_rows[0]
        assert (bands is None) == (rows_per_strip == 7)
        if bands is not None:
            assert bands * 1500 * 3 <= r.band_bytes and (rows_per_strip is None or rows_per_strip % bands == 0)
        for _ in range(40):
            x, y = int(rng.integers(-50, 1500)), int(rng.integers(-50, 1200))
            w, h = int(rng.integers(1, 400)), int(rng.integers(1, 400))
            want = np.full((h, w, 3), 255, np.uint8)
            ys, xs = slice(max(y, 0), min(y + h, 1200)), slice(max(x, 0), min(x + w, 1500))
            if ys.start < ys.stop and xs.start < xs.stop:
                want[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x] = img[ys, xs]
            np.testing.assert_array_equal(r.read_region(0, x, y, w, h), want)
        np.testing.assert_array_equal(r.read_region(0, 0, 0, 1500, 1200), img)
        assert r.cache.used <= r.cache_bytes
        if bands is not None:  # nothing held is bigger than a band
            assert max(c.nbytes for c in r.cache.values()) <= r.band_bytes


def test_tiff_reader_reads_only_touched_tiles(pyramid):
    path, _ = pyramid
    with open_slide(path, reader="tifffile") as r:
        r.read_region(0, 40, 40, 10, 10)  # inside tile (1, 1) only
        assert r.cache.keys() == {(0, 1, 1)}
        r.read_region(0, 30, 30, 4, 4)  # corner of four tiles
        assert {(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)} <= r.cache.keys()


def test_reopened_handles_share_decoded_tiles(pyramid, monkeypatch):
    # the reader threads' handles: a tile one of them decoded is not decoded again by another
    path, levels = pyramid
    decoded = []
    real = TiffSlideReader._decode_file_chunk
    monkeypatch.setattr(TiffSlideReader, "_decode_file_chunk", lambda self, *a: decoded.append(a) or real(self, *a))
    with open_slide(path, reader="tifffile") as r, r.reopen() as r2:
        assert r2.cache is r.cache
        np.testing.assert_array_equal(r.read_region(0, 30, 30, 20, 20), levels[0][30:50, 30:50])
        n = len(decoded)
        np.testing.assert_array_equal(r2.read_region(0, 30, 30, 20, 20), levels[0][30:50, 30:50])
        assert len(decoded) == n == 4  # (a corner of four file tiles)
        assert all(not c.flags.writeable for c in r.cache.values())  # shared: read-only
    with open_slide(path, reader="openslide") as o, o.reopen() as o2:
        assert o.cache is not None and o2.cache is o.cache
        np.testing.assert_array_equal(o2.read_region(0, 30, 30, 20, 20), levels[0][30:50, 30:50])


def _on_reopened_handles(reader, n: int, fn) -> None:
    """fn(handle) on n threads at once, each with its own handle reopened from ``reader``."""
    import threading

    handles = [reader.reopen() for _ in range(n)]
    threads = [threading.Thread(target=fn, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.close()


def test_threads_missing_the_same_tile_at_once_decode_it_once(pyramid, monkeypatch):
    import threading
    import time

    path, levels = pyramid
    decoded = []
    real = TiffSlideReader._decode_file_chunk

    def slow(self, *a):
        decoded.append(a)
        time.sleep(0.05)  # long enough for every thread to miss the same tiles meanwhile
        return real(self, *a)

    monkeypatch.setattr(TiffSlideReader, "_decode_file_chunk", slow)
    start = threading.Barrier(4)
    got = []

    def read(h):
        start.wait()
        got.append(h.read_region(0, 30, 30, 20, 20))

    with open_slide(path, reader="tifffile") as r:
        _on_reopened_handles(r, 4, read)
    assert len(got) == 4 and all(np.array_equal(g, levels[0][30:50, 30:50]) for g in got)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 4  # each of the 4 file tiles once


def test_a_tile_that_fails_to_decode_fails_every_thread_that_wanted_it(pyramid, monkeypatch):
    path, _ = pyramid

    def broken(self, level, cy, cx):
        raise SlideError(f"tile {cy},{cx} cannot be decoded")

    monkeypatch.setattr(TiffSlideReader, "_decode_file_chunk", broken)
    errors = []

    def read(h):
        try:
            h.read_region(0, 40, 40, 5, 5)
        except SlideError as e:
            errors.append(str(e))

    with open_slide(path, reader="tifffile") as r:
        _on_reopened_handles(r, 3, read)
        assert r.cache.keys() == set() and not r.cache._making  # nothing half-made stays behind
    assert errors == ["tile 1,1 cannot be decoded"] * 3


@pytest.mark.parametrize("codec", ["none", "zlib"])
def test_wide_untiled_image_decodes_each_strip_once(tmp_path, monkeypatch, codec):
    """Strips span the whole width, so grid tiles along a row read the same strips: the cache
    holds enough full rows (a small cache here, as 32 MB is for an image 24 000 px wide:
    each of 8 tiles decoded all 64 of its strips again, 512 instead of 64)."""
    img = pattern(256, 2000)
    path = tmp_path / "wide.tif"
    if codec == "none":  # one big strip, read in bands of one row
        tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=256)
        monkeypatch.setattr(TiffSlideReader, "band_bytes", 6000)
    else:
        tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=1, compression="zlib")
    monkeypatch.setattr(TiffSlideReader, "cache_bytes", 64 << 10)
    made = []
    real = TiffSlideReader._uncompressed_band if codec == "none" else TiffSlideReader._decode_file_chunk
    name = real.__name__
    monkeypatch.setattr(TiffSlideReader, name, lambda self, *a: made.append(a) or real(self, *a))
    with open_slide(path, reader="tifffile", mpp=0.5) as r:
        assert r._chunk_shape(0) == (1, 2000)
        for x in range(0, 2000, 250):
            np.testing.assert_array_equal(r.read_region(0, x, 0, 64, 64), img[:64, x:x + 64])
        assert len(made) == 64
        SlideView(r, plan_scale(r, 0.5)).read_downsampled(4.0, block=512)  # (a thumbnail)
        assert len(made) == len(set(made)) == 256  # each strip once
        assert r.cache.max_bytes <= TiffSlideReader.untiled_cache_cap


def test_a_page_of_another_aspect_is_not_a_level(tmp_path):
    """A later tiled page 32 x 4 under a 2048 x 512 level 0 is a downsample of 64 in x but 128 in
    y: not a level (it was taken as one, and read at it the slide's bottom half was white)."""
    path = tmp_path / "aspect.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(pattern(512, 2048), tile=(128, 128), photometric="rgb")
        tif.write(pattern(4, 32), tile=(16, 16), photometric="rgb")  # 64x narrower, 128x shorter
        tif.write(pattern(8, 32), tile=(16, 16), photometric="rgb")  # a true level: 64x both ways
    with open_slide(path, reader="tifffile", mpp=0.5) as r:
        assert r.level_dimensions == [(2048, 512), (32, 8)] and r.level_downsamples == [1.0, 64.0]


def test_openslide_and_tifffile_agree_on_generic_tiff(pyramid):
    path, levels = pyramid
    with open_slide(path, reader="openslide") as a, open_slide(path, reader="tifffile") as b:
        assert a.level_dimensions == b.level_dimensions
        assert a.mpp == pytest.approx(b.mpp)
        np.testing.assert_array_equal(a.read_region(0, 3, 4, 50, 40), b.read_region(0, 3, 4, 50, 40))
        # NB: OpenSlide places level-L reads at level-0 coordinates; with a non-integer downsample
        # (odd sizes: 171/86) only the origin maps exactly, elsewhere it interpolates.
        np.testing.assert_array_equal(a.read_region(1, 0, 0, 50, 40), b.read_region(1, 0, 0, 50, 40))


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


def test_not_a_slide(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("hello, not a slide")
    with pytest.raises(SlideError, match="not a slide"):
        open_slide(p)
    with pytest.raises(SlideError, match="not a TIFF slide"):
        open_slide(p, reader="tifffile")
    with pytest.raises(SlideError, match="OpenSlide"):
        open_slide(p, reader="openslide")


def test_unknown_reader(pyramid):
    with pytest.raises(SlideError, match="unknown reader 'pil'"):
        open_slide(pyramid[0], reader="pil")


def corrupt_slide(tmp_path) -> Path:
    """64x64, tiles of 32, tile 3 (bottom right) garbage."""
    path = tmp_path / "c.tif"
    write_pyramid(path, [pattern(64, 64)], tile=32, compression="zlib")
    with tifffile.TiffFile(path) as t:
        off = t.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[off:off + 16] = b"\x00garbage-bytes!!"
    path.write_bytes(bytes(data))
    return path


def test_corrupt_tile_is_named(tmp_path):
    path = corrupt_slide(tmp_path)
    with open_slide(path, reader="tifffile") as r:
        r.read_region(0, 0, 0, 32, 32)  # an intact tile still reads
        with pytest.raises(SlideError, match=r"level 0 tile 3 .*cannot be decoded"):
            r.read_region(0, 32, 32, 32, 32)


@pytest.mark.parametrize("compression", ["jpeg", "jpeg2000"])
def test_a_cut_short_jpeg_tile_is_named(tmp_path, compression):
    """A JPEG (2000) tile whose second half is zeros decoded without a word, its rest grey."""
    path = tmp_path / "j.tif"
    img = np.full((64, 64, 3), 255, np.uint8)
    img[8:56, 8:56] = (200, 120, 180)
    tifffile.imwrite(path, img, tile=(32, 32), photometric="rgb", compression=compression)
    with tifffile.TiffFile(path) as t:
        off, count = t.pages[0].dataoffsets[0], t.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    coded = data.find(b"\xff\xda" if compression == "jpeg" else b"\xff\x93", off, off + count) + 2
    cut = (coded + off + count) // 2  # (inside the coded data: before it a decoder says more itself)
    data[cut:off + count] = bytes(off + count - cut)
    path.write_bytes(bytes(data))
    with open_slide(path, reader="tifffile", mpp=0.5) as r:
        assert np.abs(r.read_region(0, 32, 32, 32, 32).astype(int) - img[32:, 32:]).mean() < 3  # intact tiles read
        with pytest.raises(SlideError, match=r"level 0 tile 0 \(row 0, column 0\) cannot be decoded .*cut short"):
            r.read_region(0, 0, 0, 32, 32)


@pytest.mark.parametrize("fmt,compression,kw", [("JPEG", 7, {}), ("JPEG2000", 33003, {"no_jp2": True})])
def test_only_codestreams_without_their_end_count_as_cut_short(fmt, compression, kw):
    """Whatever trails a whole codestream (zero padding, a stray FF, spaces: files that decode
    exactly) is fine; a codestream cut inside its coded data is not."""
    import io

    from PIL import Image

    from wsss.slide.reader import _cut_short

    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    whole = buf.getvalue()
    for tail in (b"", bytes(7), b"\xff", b"  ", b"\x12\x34"):
        assert not _cut_short(whole + tail, compression), tail
    assert _cut_short(whole[:len(whole) // 2], compression)
    assert _cut_short(whole[:len(whole) // 2] + bytes(len(whole) // 2), compression)
    assert not _cut_short(whole[:len(whole) // 2], 8)  # (zlib: not a codestream this checks)


def test_a_narrow_slides_levels_are_scaled_by_their_longer_side(tmp_path):
    """17 x 1000 with a 9 x 500 level: 2x smaller (the width's 17 / 9 = 1.89 stretched the map)."""
    path = tmp_path / "narrow.tif"
    img = pattern(1000, 17)
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(16, 16), photometric="rgb", subifds=1, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        tif.write(np.ascontiguousarray(img[::2, ::2]), tile=(16, 16), photometric="rgb", subfiletype=1)
    with open_slide(path, reader="tifffile") as r:
        assert r.level_dimensions == [(17, 1000), (9, 500)]
        assert r.level_downsamples == [1.0, 2.0]


def test_a_tiff_without_a_photometric_tag_reads_as_rgb(tmp_path):
    """No PhotometricInterpretation tag (tifffile then says 0): libtiff's guess, RGB for 3
    samples, as the old reader read it; it was refused as a damaged file."""
    import struct

    path = tmp_path / "nophot.tif"
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(32, 32), photometric="rgb", compression="zlib")
    data = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        if struct.unpack_from("<H", data, ifd + 2 + 12 * i)[0] == 262:
            struct.pack_into("<H", data, ifd + 2 + 12 * i, 65000)  # (an unknown private tag instead)
    path.write_bytes(bytes(data))
    with tifffile.TiffFile(path) as t:
        assert 262 not in t.pages[0].tags
    with open_slide(path, reader="tifffile", mpp=0.5) as r:
        np.testing.assert_array_equal(r.read_region(0, 0, 0, 64, 64), img)


@pytest.mark.parametrize("photometric", ["palette", "miniswhite", "separated", "ycbcr"])
def test_colour_models_tifffile_cannot_read_go_to_openslide(tmp_path, photometric):
    """Palette, MINISWHITE, CMYK and uncompressed YCbCr came out of the tifffile reader as
    their raw values (black, inverted, white, wrong colours); OpenSlide converts them."""
    path = tmp_path / "c.tif"
    kw = dict(tile=(32, 32), photometric=photometric, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    if photometric == "palette":
        data = np.zeros((64, 64), np.uint8)
        data[16:48, 16:48] = 1
        cmap = np.zeros((3, 256), np.uint16)
        cmap[:, 0], cmap[:, 1] = 65535, [230 * 257, 150 * 257, 200 * 257]
        kw["colormap"], want = cmap, (230, 150, 200)
    elif photometric == "miniswhite":
        data, want = np.zeros((64, 64), np.uint8), (55, 55, 55)
        data[16:48, 16:48] = 200
    elif photometric == "separated":  # CMYK
        data, want = np.zeros((64, 64, 4), np.uint8), (255, 155, 205)
        data[16:48, 16:48] = (0, 100, 50, 0)
    else:  # Y 200, no chroma: grey 200
        data, want = np.full((64, 64, 3), (255, 128, 128), np.uint8), (200, 200, 200)
        data[16:48, 16:48] = (200, 128, 128)
        kw["subsampling"] = (1, 1)
    tifffile.imwrite(path, data, **kw)
    with pytest.raises(SlideError, match=rf"c\.tif: the TIFF's colour model \(photometric {photometric.upper()}"):
        open_slide(path, reader="tifffile")
    with open_slide(path) as r:
        assert r.kind == "openslide" and r.mpp == pytest.approx(0.5)
        px = r.read_region(0, 0, 0, 64, 64).astype(int)
        assert np.abs(px[4, 4] - 255).max() <= 1 and np.abs(px[32, 32] - want).max() <= 1


def test_a_photometric_no_tiff_has_is_a_damaged_file(tmp_path):
    """Not handed to OpenSlide (which aborted the process on one such file of the set below)."""
    path = tmp_path / "d.tif"
    write_pyramid(path, [pattern(64, 64)])
    with tifffile.TiffFile(path) as t:
        at = t.pages[0].tags["PhotometricInterpretation"].valueoffset
    data = bytearray(path.read_bytes())
    data[at:at + 2] = (244).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    for reader in ("auto", "tifffile"):
        with pytest.raises(SlideError, match=r"d\.tif: photometric 244 is not a colour model TIFF defines"):
            open_slide(path, reader=reader)


def test_damaged_files_raise_slide_errors_only(tmp_path):
    """Truncated files and flipped header bytes (a fixed set of 90 damages of a small pyramid):
    opening and reading either work or raise SlideError, never another exception (one broken
    file in a run of many must be reported as such, not crash the run)."""
    src = tmp_path / "src.tif"
    write_pyramid(src, [pattern(100, 130), pattern(50, 65)], tile=32)
    data = src.read_bytes()
    rng = np.random.default_rng(0)
    damaged = tmp_path / "damaged.tif"
    for i in range(90):
        b = bytearray(data)
        if i % 3 == 0:
            b = b[:int(rng.integers(8, len(b)))]
        else:  # header and tags (i % 3 == 1) or anywhere
            for _ in range(int(rng.integers(1, 6))):
                b[int(rng.integers(0, 400 if i % 3 == 1 else len(b)))] = int(rng.integers(0, 256))
        damaged.write_bytes(bytes(b))
        for reader in ("auto", "tifffile"):
            try:
                with open_slide(damaged, reader=reader, mpp=0.5) as r:
                    w, h = r.dimensions
                    r.read_region(0, 0, 0, min(w, 64), min(h, 64))
                    r.read_region(r.level_count - 1, 0, 0, 16, 16)
            except SlideError as e:
                assert str(damaged) in str(e)
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"damage {i}, reader {reader}: {type(e).__name__}: {e}")


def test_channel_planes_are_not_an_rgb_slide(tmp_path):
    path = tmp_path / "cyx.ome.tif"
    tifffile.imwrite(path, np.stack([pattern(64, 64)[..., c] for c in range(3)]), ome=True, metadata={"axes": "CYX"})
    with pytest.raises(SlideError, match=r"stack of planes \(3 along 'C'"):
        open_slide(path, reader="tifffile")


def test_screen_resolution_is_not_a_scan_resolution(tmp_path):
    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(path, pattern(64, 64), tile=(32, 32), photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH")
    with open_slide(path) as r:
        assert not r.has_mpp and r.describe()["mpp"] is None
        with pytest.raises(SlideError, match=r"352\.8 x 352\.8 um/px, outside what a microscope scan has.*--mpp"):
            r.mpp
    with open_slide(path, mpp=0.5) as r:
        assert r.mpp == 0.5


def test_plan_refuses_to_upsample_far(pyramid):
    path, _ = pyramid
    with open_slide(path) as r:
        assert plan_scale(r, 0.25).scale == pytest.approx(0.5)  # 2x: allowed
        with pytest.raises(SlideError, match=r"0\.5 um/px, 4x coarser than the model's 0\.125 um/px.*pass --mpp"):
            plan_scale(r, 0.125)
    with open_slide(path, mpp=2.0) as r:  # (a user's --mpp: not told to pass one)
        with pytest.raises(SlideError, match=r"2 um/px \(--mpp\), 4x coarser .*Check the --mpp given") as e:
            plan_scale(r, 0.5)
        assert "pass --mpp" not in str(e.value)


def test_no_mpp_needs_override(tmp_path):
    path = tmp_path / "nompp.tif"
    write_pyramid(path, [pattern(64, 64)], resolution=False)
    with open_slide(path) as r:
        assert not r.has_mpp
        with pytest.raises(SlideError, match="no microns-per-pixel.*--mpp"):
            r.mpp
    with open_slide(path, mpp=0.25) as r:
        assert r.mpp == 0.25
    with pytest.raises(SlideError, match="--mpp must be a positive"):
        open_slide(path, mpp=-1.0)


# --------------------------------------------------------------------------------------
# resolution planning
# --------------------------------------------------------------------------------------
def test_plan_picks_matching_level_then_resamples(pyramid):
    path, levels = pyramid
    with open_slide(path) as r:
        p = plan_scale(r, 0.5)
        assert (p.level, p.scale, p.width, p.height) == (0, 1.0, 171, 203)
        p = plan_scale(r, 1.0)  # level 1 is 0.5 * 203/102 = 0.995 um/px: within 5%
        assert (p.level, p.scale, p.width, p.height) == (1, 1.0, 86, 102)
        assert p.mpp == pytest.approx(0.5 * 203 / 102)
        p = plan_scale(r, 1.5)  # between levels: read the finer level 1 and downsample
        assert p.level == 1 and p.resampled and p.scale == pytest.approx(1.5 / (0.5 * 203 / 102))
        assert (p.width, p.height) == (round(171 / 3), round(203 / 3))
        p = plan_scale(r, 0.25)  # finer than level 0: upsample level 0
        assert p.level == 0 and p.scale == pytest.approx(0.5)


def test_view_reads_level_exactly_and_resamples_smoothly(pyramid):
    path, levels = pyramid
    with open_slide(path) as r:
        v = SlideView(r, plan_scale(r, 1.0))
        np.testing.assert_array_equal(v.read(10, 20, 30, 40), levels[1][20:60, 10:40])
        v2 = SlideView(r, plan_scale(r, 1.5))
        a = v2.read(0, 0, 40, 40).astype(int)
        b = v2.read(20, 20, 40, 40).astype(int)
        # overlapping reads see the same pixels (margin keeps the filter off the box edge)
        assert np.abs(a[20:, 20:] - b[:20, :20]).max() <= 1


# --------------------------------------------------------------------------------------
# tissue
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", ["tifffile", "openslide"])
@pytest.mark.parametrize("factor", [1.0, 2.5, 7.0])
def test_thumbnail_read_in_threads_is_the_same(tmp_path, monkeypatch, reader, factor):
    """read_downsampled(workers=n): blocks in n threads, each with its own handle (all closed
    again), the same pixels as one thread."""
    path = tmp_path / "flat.tif"
    write_pyramid(path, [pattern(203, 171)])  # one level: the thumbnail decodes level 0
    with open_slide(path, reader=reader) as r:
        view = SlideView(r, plan_scale(r, 0.5))
        one = view.read_downsampled(factor, block=40)
        handles = []
        real_reopen = type(r).reopen

        def reopen(self):
            h = real_reopen(self)
            real_close, h.closed = h.close, False
            h.close = lambda: (real_close(), setattr(h, "closed", True))
            handles.append(h)
            return h

        monkeypatch.setattr(type(r), "reopen", reopen)
        many = view.read_downsampled(factor, block=40, workers=3)
    np.testing.assert_array_equal(many, one)
    assert 1 <= len(handles) <= 3 and all(h.closed for h in handles)


def test_thumbnail_block_failure_raises(tmp_path):
    with open_slide(corrupt_slide(tmp_path), reader="tifffile") as r:
        with pytest.raises(SlideError, match=r"level 0 tile 3 .*cannot be decoded"):
            SlideView(r, plan_scale(r, 0.5)).read_downsampled(1.0, block=32, workers=2)


def test_detect_tissue_on_synthetic_blob(tmp_path):
    h, w = 400, 600
    img = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = (yy - 200) ** 2 + (xx - 250) ** 2 < 120 ** 2
    img[blob] = (200, 90, 160)  # eosin-ish pink
    speck = (yy - 50) ** 2 + (xx - 550) ** 2 < 3 ** 2
    img[speck] = (120, 40, 140)  # a tiny dark speck: removed as too small
    path = tmp_path / "blob.tif"
    write_pyramid(path, [img], mpp=2.0)
    with open_slide(path) as r:
        mask, thumb = detect_tissue(SlideView(r, plan_scale(r, 2.0)), mask_mpp=4.0)
    assert mask.mask.shape == (200, 300)
    assert mask.mask[100, 125] and not mask.mask[10, 10] and not mask.mask[25, 275]
    assert mask.fraction() == pytest.approx(blob.mean(), abs=0.02)


def test_detect_tissue_on_a_small_crop(tmp_path):
    """A crop smaller than the physical minimum object (0.02 mm^2; this one is 0.016 mm^2) keeps
    its tissue: the minimum is capped at 1% of the image.  A speck under 1% still goes."""
    h = w = 512
    img = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = (yy - 256) ** 2 + (xx - 200) ** 2 < 150 ** 2
    img[blob] = (200, 90, 160)
    img[(yy - 40) ** 2 + (xx - 470) ** 2 < 12 ** 2] = (120, 40, 140)  # 0.2% of the crop
    path = tmp_path / "crop.tif"
    write_pyramid(path, [img], mpp=0.25)
    with open_slide(path) as r:
        mask, _ = detect_tissue(SlideView(r, plan_scale(r, 0.25)))
    assert mask.fraction() == pytest.approx(blob.mean(), abs=0.03)
    m = mask.mask
    assert not m[int(40 / 512 * m.shape[0]), int(470 / 512 * m.shape[1])]


def test_detect_tissue_with_no_glass_in_view_keeps_all_of_it(tmp_path):
    """A crop inside a resection: pale stroma and purple cellular regions, no glass.  Otsu on
    saturation split them and kept half; with glass beside them it still separates glass."""
    h = w = 512
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (235, 170, 205)  # stroma, saturation ~0.28
    cellular = ((xx // 128) + (yy // 128)) % 2 == 0
    img[cellular] = (140, 70, 170)  # saturation ~0.59
    path = tmp_path / "all_tissue.tif"
    write_pyramid(path, [img], mpp=1.0)
    with open_slide(path) as r:
        mask, _ = detect_tissue(SlideView(r, plan_scale(r, 1.0)))
    assert mask.fraction() > 0.99
    img[:, : w // 2] = 242  # glass on the left half
    write_pyramid(path, [img], mpp=1.0)
    with open_slide(path) as r:
        mask, _ = detect_tissue(SlideView(r, plan_scale(r, 1.0)))
    assert mask.fraction() == pytest.approx(0.5, abs=0.02)
    img[:, : w // 5] = (240, 232, 226)  # tinted glass (saturation ~0.06) on the left fifth, beside both
    img[:, w // 5: w // 2] = (235, 170, 205)
    write_pyramid(path, [img], mpp=1.0)
    with open_slide(path) as r:
        mask, _ = detect_tissue(SlideView(r, plan_scale(r, 1.0)))
    assert mask.fraction() == pytest.approx(0.8, abs=0.02)


def test_detect_tissue_blank_slide_is_empty(tmp_path):
    path = tmp_path / "blank.tif"
    write_pyramid(path, [np.full((128, 128, 3), 240, np.uint8)], mpp=1.0)
    with open_slide(path) as r:
        mask, _ = detect_tissue(SlideView(r, plan_scale(r, 1.0)))
    assert not mask.mask.any()


def test_tissue_mask_region_maps_microns():
    m = np.zeros((10, 20), bool)
    m[2:4, 5:10] = True  # mask px = 4 um
    tm = TissueMask(m, 4.0, 4.0, "test")
    reg = tm.region(0, 0, 80, 40, 1.0)  # grid at 1 um/px
    assert reg.shape == (40, 80)
    assert reg[8:16, 20:40].all() and reg.sum() == 8 * 20
    assert not tm.region(100, 100, 5, 5, 1.0).any()


def test_load_tissue_mask(tmp_path):
    from PIL import Image

    arr = np.zeros((50, 100), np.uint8)
    arr[10:20, 10:30] = 255
    p = tmp_path / "m.png"
    Image.fromarray(arr).save(p)
    tm = load_tissue_mask(p, slide_width_um=1000, slide_height_um=500)
    assert tm.mpp_x == 10 and tm.mpp_y == 10 and tm.mask.sum() == 200
    with pytest.raises(SlideError, match="aspect ratio"):
        load_tissue_mask(p, slide_width_um=500, slide_height_um=1000)
    with pytest.raises(SlideError, match="no such file"):
        load_tissue_mask(tmp_path / "x.png", slide_width_um=1, slide_height_um=1)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(SlideError, match="not an image"):
        load_tissue_mask(tmp_path / "bad.png", slide_width_um=1, slide_height_um=1)


@pytest.mark.parametrize("dtype,on", [(np.float32, 1.0), (np.float32, 0.25), (np.uint16, 1), (np.uint16, 4000)])
def test_tissue_mask_of_any_depth(tmp_path, dtype, on):
    """0/1 float or 16-bit masks are masks too (8-bit conversion made values below 1 zero)."""
    arr = np.zeros((50, 100), dtype)
    arr[10:20, 10:30] = on
    p = tmp_path / "m.tif"
    tifffile.imwrite(p, arr)
    assert load_tissue_mask(p, slide_width_um=1000, slide_height_um=500).mask.sum() == 200


def test_palette_tissue_mask_counts_indices_not_colours(tmp_path):
    """A palette (label) mask: index 0 background, 1 tissue, whatever their colours (tissue drawn
    black here: read through its brightness it was the background, and white background tissue)."""
    from PIL import Image

    arr = np.zeros((50, 100), np.uint8)
    arr[10:20, 10:30] = 1
    img = Image.fromarray(arr, mode="L").convert("P")
    img.putdata(arr.flatten().tolist())
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    img.save(tmp_path / "m.png")
    mask = load_tissue_mask(tmp_path / "m.png", slide_width_um=1000, slide_height_um=500).mask
    assert mask.sum() == 200 and mask[10:20, 10:30].all()


@pytest.mark.parametrize("unit,scale", [("\u00b5m", 1.0), ("\u03bcm", 1.0), ("nm", 1e-3)])
def test_ome_resolution_of_the_image_read(tmp_path, unit, scale):
    """OME PhysicalSize of the first image (the series read), micro sign or Greek mu."""
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(pattern(64, 64), photometric="rgb", tile=(32, 32),
                  metadata={"PhysicalSizeX": 0.5 / scale, "PhysicalSizeY": 0.5 / scale,
                            "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit})
        tif.write(pattern(16, 16), photometric="rgb",  # a label image with its own resolution
                  metadata={"PhysicalSizeX": 40.0, "PhysicalSizeY": 40.0})
    with open_slide(path, reader="tifffile") as r:
        assert r.mpp == pytest.approx(0.5)


def _ome_slide(path: Path, pixels_attrs: str) -> Path:
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="64" SizeY="64" '
           f'SizeC="3" SizeZ="1" SizeT="1" Interleaved="true" {pixels_attrs}>'
           '<Channel ID="Channel:0:0" SamplesPerPixel="3"/><TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>')
    tifffile.imwrite(path, pattern(64, 64), photometric="rgb", tile=(32, 32), description=xml.encode(), metadata=None)
    return path


@pytest.mark.parametrize("attrs,mpp", [
    ('PhysicalSizeX="0.25" PhysicalSizeY="0.00025" PhysicalSizeYUnit="mm"', 0.25),  # (Y's unit was X's)
    ('PhysicalSizeX="250" PhysicalSizeXUnit="nm" PhysicalSizeY="0.25"', 0.25),
    ('PhysicalSizeX="-" PhysicalSizeY="-"', None),  # (malformed: "the TIFF's structure cannot be read")
    ('PhysicalSizeX="0.25.1" PhysicalSizeY="0.25"', None),
    ('PhysicalSizeX="0.25" PhysicalSizeY="0.25" PhysicalSizeYUnit="parsec"', None)])
def test_ome_resolution_units_per_axis_and_malformed_sizes(tmp_path, attrs, mpp):
    path = _ome_slide(tmp_path / "s.ome.tif", attrs)
    with open_slide(path, reader="tifffile") as r:
        if mpp is not None:
            assert r.mpp == pytest.approx(mpp)
        else:
            with pytest.raises(SlideError, match="no microns-per-pixel metadata; pass --mpp"):
                r.mpp
    with open_slide(path, reader="tifffile", mpp=0.4) as r:
        assert r.mpp == 0.4


@pytest.mark.parametrize("reader", ["tifffile", "openslide"])
def test_non_square_pixels_are_refused_unless_mpp_given(tmp_path, reader):
    """0.25 x 0.5 um/px was averaged to 0.375: the slide read 1.5x too wide and 0.75x too tall."""
    path = tmp_path / "aniso.tif"
    tifffile.imwrite(path, pattern(64, 64), tile=(32, 32), photometric="rgb", resolution=(4e4, 2e4),
                     resolutionunit="CENTIMETER")
    with open_slide(path, reader=reader) as r:
        assert not r.has_mpp and r.metadata_mpp is None
        with pytest.raises(SlideError, match=r"aniso\.tif: .*not square \(0\.25 um wide x 0\.5 um tall\).*--mpp"):
            r.mpp
    with open_slide(path, reader=reader, mpp=0.5) as r:
        assert r.mpp == 0.5
    tifffile.imwrite(path, pattern(64, 64), tile=(32, 32), photometric="rgb", resolution=(4e4, 4.04e4),
                     resolutionunit="CENTIMETER")  # 1% apart: rounding, square
    with open_slide(path, reader=reader) as r:
        assert r.mpp == pytest.approx(0.24876, rel=1e-3)


def test_ome_resolution_of_another_image_is_not_the_slides(tmp_path):
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(pattern(64, 64), photometric="rgb", tile=(32, 32))  # no PhysicalSize
        tif.write(pattern(16, 16), photometric="rgb", metadata={"PhysicalSizeX": 8.0, "PhysicalSizeY": 8.0})
    with open_slide(path, reader="tifffile") as r:
        assert not r.has_mpp


# --------------------------------------------------------------------------------------
# the real slide
# --------------------------------------------------------------------------------------
@needs_real
def test_real_slide_both_readers():
    with open_slide(REAL_SLIDE, reader="openslide") as a, open_slide(REAL_SLIDE, reader="tifffile") as b:
        assert a.kind == "openslide" and b.kind == "tifffile"
        assert a.dimensions == b.dimensions == (2220, 2967)
        assert a.mpp == pytest.approx(0.499) and b.mpp == pytest.approx(0.499)
        assert a.level_tile_sizes[0] == b.level_tile_sizes[0] == (240, 240)
        ra, rb = a.read_region(0, 100, 230, 300, 200), b.read_region(0, 100, 230, 300, 200)
        assert ra.shape == (200, 300, 3)
        assert np.abs(ra.astype(int) - rb).mean() < 1.0  # same JPEG tiles, maybe different IDCT
        assert (a.read_region(0, 2200, 2950, 40, 40)[-5:, -5:] == 255).all()  # outside: white


@needs_real
def test_real_slide_tissue_and_plan():
    with open_slide(REAL_SLIDE) as r:
        plan = plan_scale(r, 0.5)
        assert (plan.level, plan.scale, plan.width, plan.height) == (0, 1.0, 2220, 2967)
        mask, thumb = detect_tissue(SlideView(r, plan))
    assert 0.25 < mask.fraction() < 0.6  # skin tissue strip on white glass
    h, w = mask.mask.shape
    assert not mask.mask[: h // 10, : w // 10].any()  # top-left corner is glass
    assert mask.mask[int(h * 0.75), int(w * 0.5)]  # lower middle is tissue


def test_openslide_handle_is_closed_when_its_properties_are_malformed(tmp_path, monkeypatch):
    """A slide OpenSlide opens but whose level properties cannot be parsed: one SlideError naming
    it, and the handle closed (a run over many slides must not leak one per bad file)."""
    import openslide
    from wsss.slide.reader import OpenSlideReader

    class Malformed:
        level_dimensions = [(64, 48)]
        level_downsamples = [1.0]
        properties = {"openslide.level[0].tile-width": "wide", "openslide.level[0].tile-height": "16"}
        closed = False

        def set_cache(self, cache):
            pass

        def close(self):
            Malformed.closed = True

    monkeypatch.setattr(openslide, "OpenSlide", lambda path: Malformed())
    with pytest.raises(SlideError, match=r"bad\.svs: OpenSlide opened the slide but its levels or properties "
                                         r"cannot be read: ValueError"):
        OpenSlideReader(tmp_path / "bad.svs")
    assert Malformed.closed


# --------------------------------------------------------------------------------------
# tissue detection's documented rules, resolution planning's rounding and level choice
# --------------------------------------------------------------------------------------
GLASS, PINK = 242, (200, 90, 160)


def _detect(tmp_path, img, mpp, **kw):
    """detect_tissue on a one-level slide of ``img`` at ``mpp`` read at its own resolution."""
    path = tmp_path / "tissue.tif"
    write_pyramid(path, [img], mpp=mpp)
    with open_slide(path) as r:
        mask, _ = detect_tissue(SlideView(r, plan_scale(r, mpp)), **kw)
    return mask


def _disk(h, w, cy, cx, radius):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2


def test_small_fragments_are_kept_down_to_the_physical_minimum(tmp_path):
    """Guards against the minimum object size (0.02 mm^2) being applied in mask pixels instead
    of square microns, which left only the 1%-of-image cap: a biopsy fragment of ~0.04 mm^2
    (615 px of 64 um^2, under 1% of this 300 x 400 mask) was deleted.  One of ~0.01 mm^2 goes."""
    h, w = 300, 400
    img = np.full((h, w, 3), GLASS, np.uint8)
    img[_disk(h, w, 150, 120, 80)] = PINK  # the main piece
    big = _disk(h, w, 60, 320, 14)  # ~615 px = 0.039 mm^2 at 8 um/px: kept
    small = _disk(h, w, 220, 320, 7)  # ~154 px = 0.0098 mm^2: removed
    img[big | small] = PINK
    mask = _detect(tmp_path, img, 8.0, mask_mpp=8.0)
    assert mask.mask.shape == (h, w) and (mask.mpp_y, mask.mpp_x) == (8.0, 8.0)
    assert 0.01 * h * w > big.sum() > 20_000 / 64 > small.sum()
    assert mask.mask[150, 120] and mask.mask[60, 320] and not mask.mask[220, 320]
    assert abs(int(mask.mask[big].sum()) - int(big.sum())) < 0.05 * big.sum()


def test_small_holes_are_filled_and_holes_over_the_minimum_kept(tmp_path):
    """Guards against hole filling being skipped: a 12 x 12 px hole (0.009 mm^2 at 8 um/px,
    under the documented 0.02 mm^2) inside tissue is filled; a 22 x 22 one (0.031 mm^2) stays."""
    h, w = 300, 400
    img = np.full((h, w, 3), GLASS, np.uint8)
    img[_disk(h, w, 150, 200, 110)] = PINK
    img[114:126, 154:166] = GLASS  # small hole
    img[159:181, 219:241] = GLASS  # large hole
    mask = _detect(tmp_path, img, 8.0, mask_mpp=8.0)
    assert mask.mask[114:126, 154:166].all()
    assert not mask.mask[162:178, 222:238].any()
    assert mask.mask[150, 100] and not mask.mask[5, 5]


def test_dark_saturated_specks_are_not_tissue(tmp_path):
    """Guards against the near-black test (max channel > 0.1) being dropped: pen ink or dust,
    dark but strongly saturated (here 20, 4, 16: saturation 0.8), on glass is not tissue,
    even where it is big enough to survive the minimum object size."""
    h, w = 300, 400
    img = np.full((h, w, 3), GLASS, np.uint8)
    img[_disk(h, w, 150, 120, 80)] = PINK
    dark = _disk(h, w, 150, 320, 30)
    img[dark] = (20, 4, 16)
    mask = _detect(tmp_path, img, 8.0, mask_mpp=8.0)
    assert mask.mask[150, 120]
    assert not mask.mask[dark].any()


def test_a_blank_slide_with_faint_noise_has_no_tissue(tmp_path):
    """Guards against the Otsu threshold losing its floor (min_saturation 0.04): on glass with
    +-3 grey levels of noise per channel (saturation <= 0.025) Otsu splits the noise and half
    the slide, closed up, became tissue."""
    rng = np.random.default_rng(3)
    img = (GLASS + rng.integers(-3, 4, (200, 200, 3))).astype(np.uint8)
    mask = _detect(tmp_path, img, 4.0)  # (default mask_mpp: 4 um/px, the thumbnail is the slide)
    assert mask.mask.shape == (200, 200)
    assert mask.threshold is not None and mask.threshold >= 0.04
    assert not mask.mask.any()


def test_a_user_mask_of_rounded_sides_maps_pixel_centres_per_axis(tmp_path):
    """Guards against a user mask's mpp_y/mpp_x being swapped (load_tissue_mask or
    TissueMask.sample_index) and against sampling at a grid pixel's corner instead of its
    centre.  A 16 x 21 mask over a 1000 x 800 um slide (aspect within the 5% allowed):
    50 um per mask row, 47.6 um per mask column; on a 10 um grid each grid pixel takes the
    mask pixel holding its centre (independently: searchsorted on the mask's pixel edges)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    arr = (rng.random((16, 21)) < 0.5).astype(np.uint8) * 255
    p = tmp_path / "m.png"
    Image.fromarray(arr).save(p)
    tm = load_tissue_mask(p, slide_width_um=1000, slide_height_um=800)
    assert tm.mpp_y == pytest.approx(50.0) and tm.mpp_x == pytest.approx(1000 / 21)

    def want(x, y, width, height):
        cy, cx = (np.arange(y, y + height) + 0.5) * 10.0, (np.arange(x, x + width) + 0.5) * 10.0
        r = np.searchsorted(np.arange(17) * 50.0, cy, side="right") - 1
        c = np.searchsorted(np.arange(22) * (1000 / 21), cx, side="right") - 1
        inside = (cy < 800)[:, None] & (cx < 1000)[None, :]
        return (arr > 0)[r.clip(0, 15)[:, None], c.clip(0, 20)[None, :]] & inside

    for x, y, width, height in [(0, 0, 100, 80), (13, 7, 41, 29), (90, 70, 15, 15)]:
        np.testing.assert_array_equal(tm.region(x, y, width, height, 10.0), want(x, y, width, height))


def test_plan_rounds_the_resampled_grid_size(pyramid):
    """Guards against the output grid's size being truncated instead of rounded: 171 px at
    0.5 um/px read at 1.3 um/px is 65.77 px wide: 66 columns (int() gave 65, losing the last
    column of the slide); 203 px is 78.08 rows: 78."""
    path, _ = pyramid
    with open_slide(path) as r:
        p = plan_scale(r, 1.3)
        assert p.resampled and (p.width, p.height) == (66, 78)
        p = plan_scale(r, 0.3)  # (upsampled: 285 x 338.33)
        assert (p.width, p.height) == (285, 338)
        p = plan_scale(r, 0.7)  # 122.14 x 145.0
        assert (p.width, p.height) == (122, 145)


def test_plan_prefers_the_coarsest_of_two_matching_levels(tmp_path):
    """Guards against the finest instead of the coarsest level being read when two levels are
    within the 5% tolerance of the target (0.5 and 0.521 um/px for 0.51): the documented rule
    reads the coarsest, as is (fewer pixels, nothing resampled)."""
    from PIL import Image

    l0 = pattern(200, 200)
    l1 = np.asarray(Image.fromarray(l0).resize((192, 192), Image.BOX))
    path = tmp_path / "close.tif"
    write_pyramid(path, [l0, l1])
    with open_slide(path) as r:
        assert [r.level_mpp(i) for i in range(2)] == pytest.approx([0.5, 0.5 * 200 / 192])
        p = plan_scale(r, 0.51)
        assert (p.level, p.scale, p.width, p.height) == (1, 1.0, 192, 192)
        assert p.mpp == pytest.approx(0.5 * 200 / 192)
        assert plan_scale(r, 0.49).level == 0  # (only level 0 within 5%)


@needs_real
def test_auto_reads_the_real_svs_with_tifffile_to_openslides_pixels():
    """An Aperio SVS of JPEG tiles is a TIFF tifffile decodes directly, 3.6x faster per grid tile
    than OpenSlide's read_region here: auto takes tifffile for it, and every 256-px grid tile
    (overlap 32, the edge tiles leaving the slide included) is OpenSlide's, pixel for pixel."""
    from wsss.runner.tiling import TileGrid

    with open_slide(REAL_SLIDE) as auto, open_slide(REAL_SLIDE, reader="openslide") as ref:
        assert auto.kind == "tifffile" and auto.mpp == ref.mpp
        assert auto.level_dimensions == ref.level_dimensions
        w, h = auto.dimensions
        grid = TileGrid(w + 100, h + 100, 256, 32)  # (past the slide's edge: white in both)
        for x, y in grid.tiles:
            np.testing.assert_array_equal(auto.read_region(0, x, y, 256, 256), ref.read_region(0, x, y, 256, 256))


@pytest.mark.parametrize("compression, kind", [("jpeg", "tifffile"), ("zlib", "openslide")])
def test_auto_takes_tifffile_only_for_an_aperio_svs_of_jpeg_tiles(tmp_path, compression, kind):
    """OpenSlide's "aperio" format: tifffile where every level is tiled JPEG (the same pixels,
    faster), OpenSlide for anything else in an SVS (JPEG 2000's YCbCr codestreams, which
    OpenSlide converts, or here zlib); both read the same pixels and mpp."""
    import openslide

    rng = np.random.default_rng(1)
    l0 = rng.integers(0, 256, (512, 384, 3), dtype=np.uint8)
    path = tmp_path / "a.svs"
    with tifffile.TiffWriter(path) as t:
        for img in (l0, l0[::2, ::2].copy()):
            t.write(img, tile=(128, 128), compression=compression, photometric="rgb", metadata=None,
                    description=f"Aperio Image Library v12.0.0\n{img.shape[1]}x{img.shape[0]} (128x128) "
                                f"|AppMag = 20|MPP = 0.5")
    assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
    with open_slide(path) as r, open_slide(path, reader="openslide") as ref:
        assert r.kind == kind and r.mpp == pytest.approx(0.5) and r.level_count == ref.level_count == 2
        for level in (0, 1):
            np.testing.assert_array_equal(r.read_region(level, 0, 0, 192, 256), ref.read_region(level, 0, 0, 192, 256))
