"""Whole-slide readers: one interface over OpenSlide (vendor formats) and tifffile (generic/OME TIFF).

A ``SlideReader`` exposes the pyramid (``level_dimensions``, ``level_downsamples``), the
level-0 microns per pixel (``mpp``) and ``read_region(level, x, y, w, h) -> uint8 [h, w, 3]``
in that level's own pixel coordinates; pixels outside the level are white (255).

The tifffile reader never decodes a whole level: it reads only the file's own tiles (or
strips) that a region touches, straight from their byte offsets, and keeps a small LRU
cache of decoded tiles so overlapping reads (tiling with overlap) decode each tile once.
NB: readers are not shared between threads; a worker calls ``reopen()`` for its own handle.
"""
from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from wsss.errors import SlideError

__all__ = ["SlideReader", "OpenSlideReader", "TiffSlideReader", "open_slide", "READERS", "ThreadHandles"]

READERS = ("auto", "openslide", "tifffile")

# Level-0 microns per pixel a microscope scan can have.  Resolution metadata outside this range
# describes something else (a screen or print resolution: 72 dpi is 352.8 um/px), and a run at
# it would upsample the slide into millions of tiles of nothing.
PLAUSIBLE_MPP = (0.02, 20.0)
# x and y microns per pixel further apart than this (relative) are not square pixels
SQUARE_MPP_TOLERANCE = 0.02


def _positive_finite(v: float) -> bool:
    """Whether ``v`` can be a number of microns per pixel (positive and finite)."""
    return v > 0 and math.isfinite(v)


class SlideReader:
    """Common interface.  Coordinates: (x, y) = (column, row) in the pixels of ``level``."""

    kind: str = "?"

    def __init__(self, path: Path, mpp_override: Optional[float] = None) -> None:
        self.path = Path(path)
        self.mpp_override = mpp_override
        self.level_dimensions: list[Tuple[int, int]] = []  # (width, height) per level
        self.level_downsamples: list[float] = []
        self.level_tile_sizes: list[Optional[Tuple[int, int]]] = []  # (tile_w, tile_h) in the file
        self._metadata_mpp: Optional[Tuple[float, float]] = None

    # -- geometry ----------------------------------------------------------------------
    @property
    def dimensions(self) -> Tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def has_mpp(self) -> bool:
        return self.mpp_override is not None or self._metadata_mpp_usable

    @property
    def _metadata_mpp_plausible(self) -> bool:
        lo, hi = PLAUSIBLE_MPP
        return self._metadata_mpp is not None and all(lo <= v <= hi for v in self._metadata_mpp)

    @property
    def _metadata_mpp_square(self) -> bool:
        mx, my = self._metadata_mpp
        return abs(mx - my) <= SQUARE_MPP_TOLERANCE * max(mx, my)

    @property
    def _metadata_mpp_usable(self) -> bool:
        return self._metadata_mpp_plausible and self._metadata_mpp_square

    @property
    def metadata_mpp_xy(self) -> Optional[Tuple[float, float]]:
        """Level-0 (x, y) microns per pixel as the file's metadata says, square or not (None: none)."""
        return None if self._metadata_mpp is None else tuple(float(v) for v in self._metadata_mpp)

    @property
    def metadata_mpp(self) -> Optional[float]:
        """Level-0 microns per pixel from the file's own metadata (mean of x and y; None where it
        has none, an implausible one or non-square pixels), whatever ``mpp_override`` says."""
        if not self._metadata_mpp_usable:
            return None
        return float(sum(self._metadata_mpp) / 2.0)

    @property
    def mpp(self) -> float:
        """Microns per pixel of level 0 (the mean of x and y); SlideError if unknown, implausible
        or not square."""
        if self.mpp_override is not None:
            return float(self.mpp_override)
        if self._metadata_mpp is None:
            raise SlideError(
                f"{self.path}: the slide has no microns-per-pixel metadata; "
                f"pass --mpp (e.g. --mpp 0.5 for a 20x scan) to say its resolution")
        if not self._metadata_mpp_plausible:
            mx, my = self._metadata_mpp
            raise SlideError(
                f"{self.path}: the slide's resolution metadata says {mx:.4g} x {my:.4g} um/px, outside what "
                f"a microscope scan has ({PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px; a screen or print "
                f"resolution such as 72 dpi is 352.8 um/px); pass --mpp (e.g. --mpp 0.5 for a 20x scan) "
                f"to say its resolution")
        if not self._metadata_mpp_square:
            # NB: refused, not averaged: the grid, areas and outputs assume square pixels, and a
            # mean stretches the slide (0.25 x 0.5 read at 0.375 is 1.5x too wide, 0.75x too tall)
            mx, my = self._metadata_mpp
            raise SlideError(
                f"{self.path}: the slide's resolution metadata says its pixels are not square ({mx:.4g} um "
                f"wide x {my:.4g} um tall); wsss reads square pixels only; pass --mpp to read them as "
                f"square pixels of that size anyway")
        return self.metadata_mpp

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def describe(self) -> dict:
        """JSON-able summary for run.json."""
        return {
            "path": str(self.path), "reader": self.kind,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [float(d) for d in self.level_downsamples],
            "mpp": self.mpp if self.has_mpp else None,
            "mpp_source": "--mpp" if self.mpp_override is not None else ("metadata" if self.has_mpp else None),
        }

    # -- reading ----------------------------------------------------------------------
    def read_region(self, level: int, x: int, y: int, width: int, height: int,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 [height, width, 3] RGB of ``level`` starting at (x, y); outside the level is white.
        out: such an array to write it into (and return), e.g. a slot of a batch buffer."""
        raise NotImplementedError

    def reopen(self) -> "SlideReader":
        """A new, independent handle on the same file (for another thread)."""
        return type(self)(self.path, mpp_override=self.mpp_override)

    def spec(self) -> Optional[tuple]:
        """What opens this slide the same way in another process (``open_spec``), or None for
        readers other than this module's own (a subclass may read differently)."""
        if type(self) not in (OpenSlideReader, TiffSlideReader):
            return None
        return (self.kind, str(self.path), self.mpp_override)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")


# --------------------------------------------------------------------------------------
# OpenSlide
# --------------------------------------------------------------------------------------
class OpenSlideReader(SlideReader):
    """Vendor formats through openslide-python (+ openslide-bin).

    NB: OpenSlide takes a level-L region's origin in level-0 coordinates; where a level's
    downsample is not an integer, (x, y) * downsample is rounded and OpenSlide interpolates
    the sub-pixel rest, so reads at such levels may differ slightly from the stored pixels.
    """

    kind = "openslide"
    cache_bytes = 32 << 20  # OpenSlide's decoded-tile cache, shared by reopen()ed handles

    def __init__(self, path: Path, mpp_override: Optional[float] = None, *, _shared_cache=None) -> None:
        super().__init__(path, mpp_override)
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{self.path}: not a slide OpenSlide can open (unsupported or unrecognised format)") from None
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: OpenSlide cannot read the slide: {e}") from None
        try:
            self._read_structure(openslide, _shared_cache)
        except Exception as e:
            self._slide.close()  # (the handle is not leaked by a slide that fails here)
            if isinstance(e, SlideError):
                raise
            raise SlideError(f"{self.path}: OpenSlide opened the slide but its levels or properties cannot be "
                             f"read: {type(e).__name__}: {e}") from None

    def _read_structure(self, openslide, shared_cache) -> None:
        # NB: as for the tifffile reader, one cache for the handles of all reader threads (each
        # handle has its own otherwise); OpenSlide >= 4.0 with openslide-python >= 1.3
        self.cache = shared_cache
        if self.cache is None and hasattr(openslide, "OpenSlideCache"):
            try:
                self.cache = openslide.OpenSlideCache(self.cache_bytes)
            except openslide.OpenSlideVersionError:
                self.cache = None
        if self.cache is not None:
            self._slide.set_cache(self.cache)
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        for lvl in range(self.level_count):
            tw = props.get(f"openslide.level[{lvl}].tile-width")
            th = props.get(f"openslide.level[{lvl}].tile-height")
            self.level_tile_sizes.append((int(tw), int(th)) if tw and th else None)
        try:
            mx, my = float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y])
            if _positive_finite(mx) and _positive_finite(my):
                self._metadata_mpp = (mx, my)
        except (KeyError, ValueError):
            pass
        self.vendor = props.get("openslide.vendor", "?")

    def reopen(self) -> "OpenSlideReader":
        """A new handle on the same file (for another thread) that shares this one's tile cache."""
        return type(self)(self.path, mpp_override=self.mpp_override, _shared_cache=self.cache)

    def read_region(self, level: int, x: int, y: int, width: int, height: int,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
        import openslide

        self._check_level(level)
        ds = self.level_downsamples[level]
        try:
            rgba = np.asarray(self._slide.read_region((int(round(x * ds)), int(round(y * ds))), level,
                                                      (int(width), int(height))))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: cannot read level {level} region x={x} y={y} "
                             f"{width}x{height} (corrupt tile?): {e}") from None
        if out is None:
            return _rgba_on_white(rgba)
        out[...] = _rgba_on_white(rgba)
        return out

    def describe(self) -> dict:
        d = super().describe()
        d["vendor"] = self.vendor
        return d

    def close(self) -> None:
        self._slide.close()


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [h,w,4] -> uint8 [h,w,3] composited over white (transparent = outside the slide)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class _DamagedTiff(SlideError):
    """A TIFF the tifffile reader finds damaged: open_slide does not hand it to OpenSlide.

    NB: OpenSlide aborted the whole process (not an error) on such a file: a damaged tag made its
    tiles 1.9e9 px tall, and it allocated them (240 GB)."""


# TIFF photometric and compression codes
_MINISBLACK, _RGB, _YCBCR = 1, 2, 6
_JPEG = 7
# compression -> (how its chunks start where they are codestreams, the marker that starts their
# coded data: JPEG's SOS, JPEG 2000's SOD).  Both end with the marker FFD9 (EOI; EOC), which the
# coded data cannot contain (JPEG stuffs FF with 00 or RSTn; JPEG 2000 follows FF with < 0x90),
# so a whole codestream has an FFD9 after its last coded-data marker, whatever trails it.
_CODESTREAMS = {_JPEG: (b"\xff\xd8", b"\xff\xda"),
                **{c: (b"\xff\x4f\xff\x51", b"\xff\x93") for c in (33003, 33004, 33005, 34712)}}


def _cut_short(data: bytes, compression: int) -> bool:
    """Whether a JPEG / JPEG 2000 chunk is a codestream without its end (a decoder fills the
    rest with grey without a word)."""
    kind = _CODESTREAMS.get(compression)
    if kind is None or not data.startswith(kind[0]):
        return False
    return data.rfind(b"\xff\xd9") < data.rfind(kind[1])


# OME length units in micrometres (micro sign U+00B5 and Greek mu U+03BC both occur)
_OME_UM = {"\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _ome_physical_size(tag: str, axis: str) -> Optional[float]:
    """OME PhysicalSize{axis} of a <Pixels> tag in micrometres, in its own unit (default um);
    None where absent, malformed, in an unknown unit, or not positive and finite."""
    size = re.search(rf'PhysicalSize{axis}="([^"]*)"', tag)
    unit = re.search(rf'PhysicalSize{axis}Unit="([^"]*)"', tag)
    scale = _OME_UM.get(unit.group(1) if unit else "um")
    v = _number(size.group(1)) if size else None
    if v is None or scale is None or not _positive_finite(v * scale):
        return None
    return v * scale


def _is_downsample(w0: int, h0: int, w: int, h: int) -> bool:
    """Whether w x h is level 0's w0 x h0 reduced by one downsample ds in both directions, each
    size within a pixel (|w0 / ds - w| <= 1 and |h0 / ds - h| <= 1 for some ds)."""
    lo = max(w0 / (w + 1), h0 / (h + 1))
    hi = min(w0 / (w - 1) if w > 1 else math.inf, h0 / (h - 1) if h > 1 else math.inf)
    return lo <= hi


# --------------------------------------------------------------------------------------
# tifffile
# --------------------------------------------------------------------------------------
class TiffSlideReader(SlideReader):
    """Generic / OME / pyramidal TIFF through tifffile, decoding only the tiles a read touches.

    Levels: the pyramid of the first series (SubIFDs / OME / SVS) or, for files written as
    one page per level, the following pages whose shape is a downsample of page 0.
    """

    kind = "tifffile"
    # NB: one cache for a handle and every handle reopen()ed from it (the reader threads): with
    # a cache per thread, neighbouring tiles landed on other threads and each file tile was
    # decoded 1.2x (2 readers) to 2.0x (8 readers) per grid tile instead of 0.75x
    cache_bytes = 32 << 20  # (two rows of 256-px RGB file tiles of a slide 20 000 px wide)
    # NB: an untiled level's chunks (strips, bands) span its whole width, so every grid tile along
    # a row of them reads the same chunks: the cache holds at least ``untiled_cache_rows`` full rows
    # of it (a read_downsampled block of 2048 rows, or two rows of grid tiles up to 1024 px) plus
    # two chunks, up to ``untiled_cache_cap``.  With 32 MB, 12 grid tiles of 512 px of an image
    # 24 000 px wide in one-row strips decoded 6144 strips instead of 512 (LRU thrash).
    untiled_cache_rows = 2048
    untiled_cache_cap = 256 << 20

    def __init__(self, path: Path, mpp_override: Optional[float] = None, *,
                 _shared_cache: Optional["_ChunkCache"] = None) -> None:
        super().__init__(path, mpp_override)
        import tifffile

        try:
            self._tif = tifffile.TiffFile(str(self.path))
        except Exception as e:  # TiffFileError, OSError, and others from a damaged header
            raise SlideError(f"{self.path}: not a TIFF slide tifffile can open: {e}") from None
        try:
            self._read_structure()
        except Exception as e:
            self._tif.close()
            if isinstance(e, SlideError):
                raise
            # NB: a damaged header fails inside tifffile in many ways (ValueError, TypeError,
            # IndexError, KeyError, ...): one message, the run's other slides go on
            raise SlideError(f"{self.path}: the TIFF's structure cannot be read (corrupt or truncated "
                             f"file?): {type(e).__name__}: {e}") from None
        self.cache = _shared_cache if _shared_cache is not None else _ChunkCache(self._cache_size())
        self._lock = threading.Lock()  # this handle's file position

    def jpeg_tiled(self) -> bool:
        """Whether every level is tiled and JPEG-compressed (RGB or YCbCr in JPEG)."""
        return all(page.is_tiled and int(page.compression) == _JPEG for page in self._pages)

    def reopen(self) -> "TiffSlideReader":
        """A new handle on the same file (for another thread) that shares this one's decoded tiles."""
        return type(self)(self.path, mpp_override=self.mpp_override, _shared_cache=self.cache)

    def _cache_size(self) -> int:
        """Bytes of decoded chunks to keep: ``cache_bytes``, more for a wide untiled level."""
        size = self.cache_bytes
        for level, page in enumerate(self._pages):
            if not page.is_tiled:
                chunk_rows = self._chunk_shape(level)[0]
                row_bytes = self.level_dimensions[level][0] * (page.shape[2] if len(page.shape) == 3 else 1)
                want = (self.untiled_cache_rows + 2 * chunk_rows) * row_bytes
                size = max(size, min(want, self.untiled_cache_cap))
        return size

    # -- structure ----------------------------------------------------------------------
    def _read_structure(self) -> None:
        self._pages = self._find_levels()
        for level, page in enumerate(self._pages):
            h, w = int(page.shape[0]), int(page.shape[1])
            if h < 1 or w < 1:
                raise SlideError(f"{self.path}: an image level of {w} x {h} pixels is empty")
            self.level_dimensions.append((w, h))
            self.level_tile_sizes.append((int(page.tilewidth), int(page.tilelength)) if page.is_tiled else None)
            chunks = math.prod(page.chunked)
            if len(page.dataoffsets) < chunks or len(page.databytecounts) < chunks:
                raise SlideError(f"{self.path}: level {level} lists {len(page.dataoffsets)} tile offsets and "
                                 f"{len(page.databytecounts)} byte counts for {chunks} tiles (corrupt file?)")
        # NB: from the longer side, where the sizes' rounding weighs least: a 17 x 1000 slide's
        # 9 x 500 level is 2x smaller, not the width's 1.89x (its map came out stretched 6%)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = [w0 / w if w0 >= h0 else h0 / h for w, h in self.level_dimensions]
        self._metadata_mpp = self._read_mpp()
        self._band_rows = [self._uncompressed_band_rows(page) for page in self._pages]

    band_bytes = 1 << 20  # rows read at a time from a large uncompressed strip

    def _uncompressed_band_rows(self, page) -> Optional[int]:
        """Rows per read for a page of large uncompressed strips (None: read its own chunks).

        NB: PIL, ImageJ and many exporters write a flat image as ONE uncompressed strip; decoding
        it as a chunk held the whole image in every reader thread (and past the tile cache's
        bound).  Uncompressed rows are plain bytes at known offsets, so such strips are read in
        bands of about ``band_bytes`` rows: memory stays bounded whatever the image's size."""
        rows_per_strip = int(page.chunks[0])
        row_bytes = int(page.shape[1]) * (int(page.shape[2]) if len(page.shape) == 3 else 1)
        if page.is_tiled or page.compression != 1 or rows_per_strip * row_bytes <= 4 * self.band_bytes:
            return None
        target = max(1, self.band_bytes // row_bytes)
        if int(page.chunked[0]) == 1:
            return target
        return next(v for v in range(min(target, rows_per_strip), 0, -1) if rows_per_strip % v == 0)

    def _find_levels(self) -> list:
        tif = self._tif
        if not tif.series:
            raise SlideError(f"{self.path}: TIFF file has no images (truncated or damaged file?)")
        series = tif.series[0]
        extra = {a: n for a, n in zip(series.axes, series.shape) if a not in "YXS" and n > 1}
        if extra:  # e.g. an OME-TIFF with channels as separate planes (CYX), a z-stack, a time series
            what = ", ".join(f"{n} along {a!r}" for a, n in extra.items())
            raise SlideError(f"{self.path}: the image is a stack of planes ({what}; axes {series.axes}), "
                             f"not an RGB or grey slide; wsss reads 8-bit RGB (interleaved) or grey slides")
        pages = []
        for lvl in series.levels:
            page = lvl.keyframe if hasattr(lvl, "keyframe") else lvl.pages[0]
            pages.append(page)
        h0, w0 = pages[0].shape[:2]
        # (a level whose sizes are not one downsample of level 0's would be read stretched)
        pages = pages[:1] + [p for p in pages[1:] if _is_downsample(w0, h0, p.shape[1], p.shape[0])]
        if len(pages) == 1:
            # One page per level (no SubIFDs): take later pages that downsample page 0.
            for page in tif.pages[1:]:
                if not hasattr(page, "shape") or len(page.shape) < 2:
                    continue
                h, w = page.shape[:2]
                prev_h, prev_w = pages[-1].shape[:2]
                if not (h < prev_h and w < prev_w):
                    continue
                if not _is_downsample(w0, h0, w, h):
                    continue
                if not page.is_tiled:  # thumbnails / label images are stripped
                    continue
                pages.append(page)
        for page in pages:
            self._check_page(page)
        return pages

    def _check_page(self, page) -> None:
        shape = page.shape
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise SlideError(f"{self.path}: unsupported image shape {tuple(shape)} (expected H x W x 1/3/4 samples)")
        if page.dtype != np.uint8:
            raise SlideError(f"{self.path}: unsupported pixel type {page.dtype} (8-bit RGB or grey slides only)")
        if page.planarconfig != 1 and len(shape) == 3 and shape[2] > 1:
            raise SlideError(f"{self.path}: planar (separate) colour channels are not supported")
        if getattr(page, "imagedepth", 1) != 1:
            raise SlideError(f"{self.path}: 3-D (image depth > 1) TIFF is not a slide")
        # NB: chunks are used as decoded, so only colour models whose decoded values are RGB or
        # grey: palette indices, inverted grey (MINISWHITE), CMYK or raw YCbCr came out wrong
        # (open_slide's "auto" then opens a tiled one with OpenSlide, which converts them)
        photometric, compression = int(page.photometric), int(page.compression)
        if 262 not in page.tags:  # no PhotometricInterpretation tag: libtiff's guess from the samples
            photometric = _RGB if len(shape) == 3 and shape[2] >= 3 else _MINISBLACK
        elif getattr(page.photometric, "name", None) is None:  # (tifffile knows them all)
            raise _DamagedTiff(f"{self.path}: photometric {photometric} is not a colour model TIFF defines "
                               f"(damaged file?)")
        if not (photometric in (_MINISBLACK, _RGB) or (photometric == _YCBCR and compression == _JPEG)):
            what = page.photometric.name
            if photometric == _YCBCR:
                what += f" with compression {getattr(page.compression, 'name', compression)}"
            raise SlideError(f"{self.path}: the TIFF's colour model (photometric {what}) is not one the tifffile "
                             f"reader reads (RGB, MINISBLACK grey, or YCbCr in JPEG); OpenSlide (--reader "
                             f"openslide) reads it if the TIFF is tiled")

    def _read_mpp(self) -> Optional[Tuple[float, float]]:
        tif = self._tif
        page = self._pages[0]
        # Aperio description "... |MPP = 0.499|"
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            v = _number(m.group(1))
            if v is not None and _positive_finite(v):
                return (v, v)
        # OME-XML PhysicalSizeX/Y (default unit micrometre)
        if tif.is_ome and tif.ome_metadata:
            # NB: the first image's <Pixels> element (the one read: series 0), not the first
            # PhysicalSizeX anywhere in the XML, which may belong to a label or macro image
            pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", tif.ome_metadata)
            tag = pixels.group(0) if pixels else tif.ome_metadata
            x = _ome_physical_size(tag, "X")
            y = _ome_physical_size(tag, "Y") if 'PhysicalSizeY="' in tag else x
            if x is not None and y is not None:
                return (x, y)
        # Resolution tags: pixels per unit, unit 2 = inch, 3 = centimetre.
        tags = page.tags
        unit = tags.get("ResolutionUnit")
        xr, yr = tags.get("XResolution"), tags.get("YResolution")
        if unit is not None and xr is not None and yr is not None:
            per_unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            try:
                xres = xr.value[0] / xr.value[1]
                yres = yr.value[0] / yr.value[1]
            except (TypeError, ZeroDivisionError, IndexError):
                return None
            if per_unit_um and xres > 0 and yres > 0:
                return (per_unit_um / xres, per_unit_um / yres)
        return None

    # -- reading ------------------------------------------------------------------------
    def _chunk_shape(self, level: int) -> Tuple[int, int]:
        """(rows, columns) of the chunks reads of ``level`` go by (file tiles or strips, or bands)."""
        band = self._band_rows[level]
        page = self._pages[level]
        return (band, int(page.shape[1])) if band is not None else (int(page.chunks[0]), int(page.chunks[1]))

    def _decoded_chunk(self, level: int, cy: int, cx: int) -> np.ndarray:
        """Decoded chunk at chunk row cy, column cx (``_chunk_shape``): uint8 [ch, cw, S], cached."""
        if self._band_rows[level] is not None:
            return self.cache.get_or_make((level, cy, cx), lambda: self._uncompressed_band(level, cy))
        return self.cache.get_or_make((level, cy, cx), lambda: self._decode_file_chunk(level, cy, cx))

    def _read_bytes(self, level: int, index: int, offset: int, count: int) -> bytes:
        fh = self._tif.filehandle
        with self._lock:
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise SlideError(f"{self.path}: level {level} tile {index} is truncated "
                             f"(file ends before its {count} bytes)")
        return data

    def _uncompressed_band(self, level: int, band: int) -> np.ndarray:
        """Rows [band * R, (band + 1) * R) of an uncompressed stripped page, read as bytes."""
        page = self._pages[level]
        R = self._band_rows[level]
        w, h = self.level_dimensions[level]
        samples = page.shape[2] if len(page.shape) == 3 else 1
        rows_per_strip, row_bytes = int(page.chunks[0]), w * samples
        r0 = band * R
        n = min(R, h - r0)
        strip = r0 // rows_per_strip  # (R divides rows_per_strip: a band lies in one strip)
        offset, count = page.dataoffsets[strip], page.databytecounts[strip]
        if count == 0 or offset == 0:
            return np.full((n, w, samples), 255, np.uint8)  # sparse (never written) strip
        start = (r0 - strip * rows_per_strip) * row_bytes
        if start + n * row_bytes > count:
            raise SlideError(f"{self.path}: level {level} strip {strip} holds {count} bytes, fewer than its "
                             f"rows need (corrupt file?)")
        data = self._read_bytes(level, strip, offset + start, n * row_bytes)
        return np.frombuffer(data, np.uint8).reshape(n, w, samples)

    def _decode_file_chunk(self, level: int, cy: int, cx: int) -> np.ndarray:
        """The file's own tile or strip at (cy, cx), decoded: uint8 [ch, cw, S]."""
        page = self._pages[level]
        nx = page.chunked[1]
        index = cy * nx + cx
        ch, cw = page.chunks[0], page.chunks[1]
        samples = page.shape[2] if len(page.shape) == 3 else 1
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0 or offset == 0:
            return np.full((ch, cw, samples), 255, np.uint8)  # sparse (never written) tile
        data = self._read_bytes(level, index, offset, count)
        if _cut_short(data, int(page.compression)):
            # NB: OpenSlide says "Premature end of JPEG file"; tifffile's decoder said nothing
            raise SlideError(f"{self.path}: level {level} tile {index} (row {cy}, column {cx}) cannot be "
                             f"decoded (corrupt tile?): its {page.compression.name} data is cut short "
                             f"(no end marker FFD9)")
        try:
            decoded = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as e:  # codec errors come in many types
            raise SlideError(f"{self.path}: level {level} tile {index} (row {cy}, column {cx}) "
                             f"cannot be decoded (corrupt tile?): {type(e).__name__}: {e}") from None
        if decoded is None:
            raise SlideError(f"{self.path}: level {level} tile {index} cannot be decoded (corrupt tile?)")
        return np.asarray(decoded).reshape(decoded.shape[-3], decoded.shape[-2], -1)

    def read_region(self, level: int, x: int, y: int, width: int, height: int,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
        self._check_level(level)
        x, y, width, height = int(x), int(y), int(width), int(height)
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lw), min(y + height, lh)
        # NB: written straight into ``out`` where given (a reader's batch slot: one copy per
        # chunk and no other, each copy giving up the GIL on a busy host); white only where the
        # region leaves the level
        if out is None:
            out = np.full((height, width, 3), 255, np.uint8)
        elif (x0, y0, x1, y1) != (x, y, x + width, y + height):
            out[...] = 255
        if x0 >= x1 or y0 >= y1:
            return out
        ch, cw = self._chunk_shape(level)
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                chunk = self._decoded_chunk(level, cy, cx)
                # intersection of the chunk with the requested (clipped) region, in level coords
                gy0, gx0 = max(cy * ch, y0), max(cx * cw, x0)
                gy1 = min(cy * ch + chunk.shape[0], y1)
                gx1 = min(cx * cw + chunk.shape[1], x1)
                if gy0 >= gy1 or gx0 >= gx1:
                    continue
                part = chunk[gy0 - cy * ch:gy1 - cy * ch, gx0 - cx * cw:gx1 - cx * cw]
                dst = out[gy0 - y:gy1 - y, gx0 - x:gx1 - x]
                if part.shape[2] in (1, 3):  # (grey broadcasts to RGB)
                    dst[...] = part
                else:
                    dst[...] = _rgba_on_white(part)
        return out

    def close(self) -> None:
        self._tif.close()


# --------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------
def open_spec(spec: tuple) -> SlideReader:
    """A new handle from ``SlideReader.spec()`` (in a reader process)."""
    kind, path, mpp_override = spec
    return {"openslide": OpenSlideReader, "tifffile": TiffSlideReader}[kind](Path(path), mpp_override=mpp_override)


def open_slide(path, *, reader: str = "auto", mpp: Optional[float] = None) -> SlideReader:
    """Open ``path`` with the named reader ("auto", "openslide", "tifffile").

    auto: OpenSlide for vendor formats (what OpenSlide recognises as anything but a generic
    TIFF), except Aperio SVS whose every level is tiled JPEG (``TiffSlideReader.jpeg_tiled``):
    tifffile for those and for generic/OME TIFF (faster: reads file tiles directly); OpenSlide
    again for what tifffile cannot read.  ``mpp`` overrides (or supplies) level-0 microns per
    pixel.

    NB: an SVS of JPEG tiles is a TIFF that tifffile decodes to the same pixels as OpenSlide
    (CMU-1-Small-Region: every 256-px grid tile identical), 3.6x faster per grid tile here
    (0.62 vs 2.23 ms, OpenSlide's read_region compositing and RGBA conversion): on the CPU the
    reader threads take that time from the model.  JPEG 2000 SVS (Aperio's YCbCr codestreams,
    which OpenSlide converts) stays with OpenSlide.
    """
    path = Path(path)
    if reader not in READERS:
        raise SlideError(f"unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    if mpp is not None and not _positive_finite(mpp):
        raise SlideError(f"--mpp must be a positive number of microns per pixel, got {mpp}")
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise SlideError(f"{path}: is a directory, not a slide file")
    if not os.access(path, os.R_OK):
        raise SlideError(f"{path}: file is not readable (permission denied)")
    if reader == "openslide":
        return OpenSlideReader(path, mpp)
    if reader == "tifffile":
        return TiffSlideReader(path, mpp)
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if fmt == "aperio":
        try:
            tiff = TiffSlideReader(path, mpp)
        except SlideError:
            return OpenSlideReader(path, mpp)
        if tiff.jpeg_tiled():
            return tiff
        tiff.close()
        return OpenSlideReader(path, mpp)
    if fmt is not None and fmt != "generic-tiff":
        return OpenSlideReader(path, mpp)
    try:
        return TiffSlideReader(path, mpp)
    except _DamagedTiff:
        raise
    except SlideError as tiff_error:
        if fmt is not None:
            return OpenSlideReader(path, mpp)
        raise SlideError(f"{path}: not a slide: neither OpenSlide nor tifffile can open it "
                         f"({tiff_error.args[0].split(': ', 1)[-1]})") from None


class _ChunkCache:
    """LRU of decoded file chunks (read-only arrays), bounded in bytes, safe to share between
    threads.  A chunk that one thread is decoding is waited for by the others (``get_or_make``):
    neighbouring grid tiles, read at the same moment by different threads, touch the same file
    tiles (8192^2 benchmark slide, 8 readers: 1218 decodes of 1024 file tiles without this)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._items: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self._making: dict = {}  # key -> threading.Event of the thread decoding it
        self._lock = threading.Lock()

    def get_or_make(self, key, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The chunk at ``key``, from the cache, or from the thread already making it, or made
        here by ``make()`` and cached."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            other = self._making.get(key)
            if other is None:
                mine = self._making[key] = threading.Event()
        if other is not None:
            other.wait()
            hit = self.get(key)
            # NB: gone already (evicted) or never made (that thread's make() raised): make it
            # here, which raises the same error in this thread too
            return hit if hit is not None else make()
        try:
            chunk = make()
            self.put(key, chunk)
            return chunk
        finally:
            with self._lock:
                del self._making[key]
            mine.set()

    def get(self, key) -> Optional[np.ndarray]:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key, chunk: np.ndarray) -> None:
        chunk.flags.writeable = False  # NB: shared between readers: nobody may change it in place
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old.nbytes
            self._items[key] = chunk
            self.used += chunk.nbytes
            while self.used > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self.used -= dropped.nbytes

    def keys(self) -> set:
        with self._lock:
            return set(self._items)

    def values(self) -> list:
        with self._lock:
            return list(self._items.values())


class ThreadHandles:
    """One handle per thread, reopened from ``source`` (a SlideReader or SlideView: handles are
    not thread-safe) on a thread's first ``get``; ``opened`` lists them all (pass the caller's
    list to own their lifetime), ``close`` closes them.  on_new runs in a thread before it
    opens its handle."""

    def __init__(self, source, *, on_new=None, opened: Optional[list] = None) -> None:
        self._source, self._on_new = source, on_new
        self._local, self._lock = threading.local(), threading.Lock()
        self.opened = opened if opened is not None else []

    def get(self):
        handle = getattr(self._local, "handle", None)
        if handle is None:
            if self._on_new is not None:
                self._on_new()
            handle = self._local.handle = self._source.reopen()
            with self._lock:
                self.opened.append(handle)
        return handle

    def close(self) -> None:
        for handle in self.opened:
            handle.close()
