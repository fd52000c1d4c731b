"""A seeded, deterministic, H&E-like tissue renderer with pixel-exact class maps.

Everything is a function of GLOBAL coordinates (in microns) and the seed: any window of an
infinite tissue plane can be rendered on its own and agrees exactly with its neighbours, so
whole slides are generated tile by tile with flat memory (wsss.synthetic.slide).

Randomness comes from an integer hash of (lattice cell, seed, channel), never from a
stateful generator, which is what makes windows independent and results reproducible on
every platform.

Classes (in LUAD-HistoSeg order, the first K are used):
  0 tumor epithelium: large, pleomorphic, crowded nuclei with chromatin texture, purple
    cytoplasm, gland lumens;
  1 necrosis: pale, granular eosin debris with small nuclear fragments;
  2 lymphocytes: small, round, dense dark nuclei packed tightly, little cytoplasm;
  3 stroma: pink fibrous streaks along a slowly turning direction, sparse spindle nuclei.
Background (index K) is white.  NB: the classes differ by texture and morphology; their
colours are drawn from the same two stains with slowly varying per-location stain strength,
so the per-pixel colour distributions of the classes overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

__all__ = ["render_tissue", "render_window", "TISSUE_KINDS", "class_names_for"]

TISSUE_KINDS = ("tumor", "necrosis", "lymphocytes", "stroma")
_SHORT_NAMES = {"tumor": "TE", "necrosis": "NEC", "lymphocytes": "LYM", "stroma": "TAS"}

# Optical densities (Ruifrok & Johnston) of hematoxylin and eosin, per unit concentration.
_OD_H = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_OD_E = np.array([0.07, 0.99, 0.11], dtype=np.float32)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def class_names_for(num_classes: int) -> Tuple[str, ...]:
    _check_num_classes(num_classes)
    return tuple(_SHORT_NAMES[k] for k in TISSUE_KINDS[:num_classes])


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= len(TISSUE_KINDS):
        raise ValueError(f"num_classes must be in 2..{len(TISSUE_KINDS)}, got {num_classes}")


# --------------------------------------------------------------------------------------
# Hash-based randomness
# --------------------------------------------------------------------------------------
def _hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int, channel: int) -> np.ndarray:
    """Uniform [0,1) float32 from integer lattice coordinates (broadcast), seed and channel."""
    with np.errstate(over="ignore"):
        key = np.uint64((seed * 0x9E3779B97F4A7C15 + channel * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E019)
                        & 0xFFFFFFFFFFFFFFFF)
        h = (np.asarray(ix, dtype=np.int64).astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)
             ^ np.asarray(iy, dtype=np.int64).astype(np.uint64) * np.uint64(0xA0761D6478BD642F)
             ^ key)
        h ^= h >> np.uint64(32)
        h *= np.uint64(0xD6E8FEB86659FD93)
        h ^= h >> np.uint64(32)
        h *= np.uint64(0xD6E8FEB86659FD93)
        h ^= h >> np.uint64(32)
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise(u: np.ndarray, v: np.ndarray, spacing: float, seed: int, channel: int) -> np.ndarray:
    """Smooth value noise in [0,1] at micron coordinates u (x), v (y) (broadcastable arrays)."""
    gu, gv = u / spacing, v / spacing
    iu, iv = np.floor(gu), np.floor(gv)
    fu, fv = _smooth((gu - iu).astype(np.float32)), _smooth((gv - iv).astype(np.float32))
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    # NB: hash the (small) lattice once and gather, instead of hashing 4 corners per pixel.
    i0, j0 = int(iu.min()), int(iv.min())
    grid = _hash_uniform(np.arange(i0, int(iu.max()) + 2)[None, :], np.arange(j0, int(iv.max()) + 2)[:, None],
                         seed, channel)
    li, lj = iu - i0, iv - j0
    c00 = grid[lj, li]
    c10 = grid[lj, li + 1]
    c01 = grid[lj + 1, li]
    c11 = grid[lj + 1, li + 1]
    top = c00 + (c10 - c00) * fu
    bottom = c01 + (c11 - c01) * fu
    return top + (bottom - top) * fv


def _fractal_noise(u, v, spacing: float, seed: int, channel: int, octaves: int = 3) -> np.ndarray:
    total, amp, norm = 0.0, 1.0, 0.0
    for o in range(octaves):
        total = total + amp * _value_noise(u, v, spacing / (2 ** o), seed, channel * 16 + o)
        norm += amp
        amp *= 0.5
    return total / norm


@dataclass(frozen=True)
class _NucleusKind:
    cell_um: float          # lattice cell size: about the nucleus spacing
    radius_um: Tuple[float, float]
    prob: float             # chance that a cell holds a nucleus
    elongation: Tuple[float, float]  # aspect ratio range (1 = round)
    channel: int


def _nuclei(u1: np.ndarray, v1: np.ndarray, kind: _NucleusKind, seed: int, edge_um: float,
            angle: np.ndarray = None) -> Tuple[np.ndarray, np.ndarray]:
    """Soft nucleus coverage in [0,1] and a per-nucleus random value, both [H,W].

    u1 [1,W] and v1 [H,1] are micron coordinates of pixel centres.  Each lattice cell holds
    at most one nucleus (jittered centre, random radius/aspect/orientation); a pixel looks
    at its own and the 8 neighbouring cells.  ``angle`` [H,W] (radians) orients all nuclei
    along a field (stroma); otherwise each nucleus has its own orientation.
    """
    cell = kind.cell_um
    ci = np.floor(u1 / cell).astype(np.int64)  # [1,W]
    cj = np.floor(v1 / cell).astype(np.int64)  # [H,1]
    # Hash the small lattice once, then gather per pixel.
    i0, i1 = int(ci.min()) - 1, int(ci.max()) + 1
    j0, j1 = int(cj.min()) - 1, int(cj.max()) + 1
    gi = np.arange(i0, i1 + 1)[None, :]
    gj = np.arange(j0, j1 + 1)[:, None]
    ch = kind.channel * 8
    jx = _hash_uniform(gi, gj, seed, ch + 0)
    jy = _hash_uniform(gi, gj, seed, ch + 1)
    rr = _hash_uniform(gi, gj, seed, ch + 2)
    pp = _hash_uniform(gi, gj, seed, ch + 3)
    aa = _hash_uniform(gi, gj, seed, ch + 4)
    ee = _hash_uniform(gi, gj, seed, ch + 5)
    tag = _hash_uniform(gi, gj, seed, ch + 6)
    coverage = np.zeros(np.broadcast_shapes(u1.shape, v1.shape), dtype=np.float32)  # [H,W] or [P]
    nucleus_tag = np.zeros_like(coverage)
    r0, r1 = kind.radius_um
    e0, e1 = kind.elongation
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            li = ci + di - i0  # [1,W]
            lj = cj + dj - j0  # [H,1]
            present = pp[lj, li] < kind.prob
            cx = (ci + di + 0.5 + 0.8 * (jx[lj, li] - 0.5)) * cell
            cy = (cj + dj + 0.5 + 0.8 * (jy[lj, li] - 0.5)) * cell
            dx = (u1 - cx).astype(np.float32)
            dy = (v1 - cy).astype(np.float32)
            radius = r0 + (r1 - r0) * rr[lj, li]
            aspect = e0 + (e1 - e0) * ee[lj, li]
            theta = angle if angle is not None else aa[lj, li] * np.float32(np.pi)
            c, s = np.cos(theta), np.sin(theta)
            along = dx * c + dy * s
            across = -dx * s + dy * c
            a_len = radius * np.sqrt(aspect)
            b_len = radius / np.sqrt(aspect)
            dist = np.sqrt((along / a_len) ** 2 + (across / b_len) ** 2)  # 1 on the rim
            cover = np.clip((1.0 - dist) * b_len / edge_um + 0.5, 0.0, 1.0) * present
            better = cover > coverage
            nucleus_tag = np.where(better, tag[lj, li], nucleus_tag)
            coverage = np.maximum(coverage, cover)
    return coverage, nucleus_tag


_TUMOR_NUCLEI = _NucleusKind(cell_um=11.0, radius_um=(3.6, 5.6), prob=0.85, elongation=(1.0, 1.8), channel=1)
_NECROSIS_DEBRIS = _NucleusKind(cell_um=6.0, radius_um=(0.7, 1.6), prob=0.45, elongation=(1.0, 2.0), channel=2)
_LYMPH_NUCLEI = _NucleusKind(cell_um=6.5, radius_um=(2.3, 3.0), prob=0.92, elongation=(1.0, 1.15), channel=3)
_STROMA_NUCLEI = _NucleusKind(cell_um=18.0, radius_um=(1.8, 2.6), prob=0.45, elongation=(3.0, 5.0), channel=4)

# Region layout: the scale (microns) of the blobs each class occupies.
_REGION_SPACING_UM = 240.0
_BACKGROUND_BIAS = -0.06


def _region_labels(u1, v1, seed: int, num_classes: int) -> np.ndarray:
    """Class map [H,W] uint8: argmax of K+1 smooth fields (index K = background)."""
    # A shared warp makes the borders organic rather than blobby.
    warp_u = (_value_noise(u1, v1, 40.0, seed, 900) - 0.5) * 30.0
    warp_v = (_value_noise(u1, v1, 40.0, seed, 901) - 0.5) * 30.0
    uu, vv = u1 + warp_u, v1 + warp_v
    fields = []
    for k in range(num_classes + 1):
        f = _fractal_noise(uu, vv, _REGION_SPACING_UM, seed, 1000 + k, octaves=2)
        if k == num_classes:
            f = f + _BACKGROUND_BIAS
        fields.append(f)
    return np.argmax(np.stack(fields, axis=0), axis=0).astype(np.uint8)


def render_window(x0: int, y0: int, height: int, width: int, *, seed: int, num_classes: int = 4,
                  mpp: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Render pixels [y0:y0+height, x0:x0+width] of the tissue plane of ``seed``.

    Returns (rgb uint8 [H,W,3], labels uint8 [H,W]) with labels 0..K-1 tissue and K background.
    ``mpp`` is microns per pixel: tissue structures keep their physical size.
    """
    _check_num_classes(num_classes)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    seed = int(seed)
    px = np.arange(x0, x0 + width, dtype=np.int64)[None, :]
    py = np.arange(y0, y0 + height, dtype=np.int64)[:, None]
    u1 = (px + 0.5) * mpp  # [1,W] microns
    v1 = (py + 0.5) * mpp  # [H,1]
    edge = max(0.6, 0.9 * mpp)  # soft edge of nuclei: about one pixel

    labels = _region_labels(u1, v1, seed, num_classes)
    shape = labels.shape
    hema = np.zeros(shape, dtype=np.float32)
    eosin = np.zeros(shape, dtype=np.float32)

    # Slowly varying stain strength (the same field for every class): this is what makes
    # the colour distributions of the classes overlap.
    h_strength = 0.70 + 0.60 * _value_noise(u1, v1, 250.0, seed, 10)
    e_strength = 0.65 + 0.70 * _value_noise(u1, v1, 250.0, seed, 11)
    fine = _value_noise(u1, v1, 1.6 * max(1.0, mpp), seed, 12)  # granularity, about a pixel or two

    # NB: textures are evaluated only at the pixels of their class (1-D coordinate arrays),
    # so the cost does not grow with the number of classes.
    for k in range(num_classes):
        where = np.nonzero(labels == k)
        if where[0].size == 0:
            continue
        kind = TISSUE_KINDS[k]
        u, v = u1[0, where[1]], v1[where[0], 0]
        fine_k = fine[where]
        if kind == "tumor":
            cov, tag = _nuclei(u, v, _TUMOR_NUCLEI, seed, edge)
            chromatin = 0.55 + 0.45 * _value_noise(u, v, 1.4, seed, 21)
            lumen = _fractal_noise(u, v, 45.0, seed, 22, octaves=2)
            # Gland lumens: pale pink secretion, no nuclei (NB: kept darker than the LUAD
            # white threshold, gray 200, so that lumens stay tissue as their label says).
            lumen_mask = np.clip((lumen - 0.66) * 12.0, 0.0, 1.0)
            h = cov * (0.85 + 0.6 * tag) * chromatin + 0.22 * (1 - cov)
            e = 0.35 + 0.15 * fine_k
            h, e = h * (1 - 0.85 * lumen_mask), e * (1 - 0.25 * lumen_mask)
        elif kind == "necrosis":
            cov, tag = _nuclei(u, v, _NECROSIS_DEBRIS, seed, edge)
            grain = _value_noise(u, v, 2.5, seed, 31)
            h = 0.10 + 0.25 * grain * fine_k + cov * (0.6 + 0.7 * tag)
            e = 0.22 + 0.45 * grain * (0.5 + fine_k)
        elif kind == "lymphocytes":
            cov, tag = _nuclei(u, v, _LYMPH_NUCLEI, seed, edge)
            h = cov * (1.45 + 0.35 * tag) + 0.10
            e = 0.18 + 0.12 * fine_k
        else:  # stroma
            angle = (_value_noise(u, v, 120.0, seed, 41) * np.float32(2.5 * np.pi)).astype(np.float32)
            c, s = np.cos(angle), np.sin(angle)
            along = u * c + v * s
            across = -u * s + v * c
            fibres = _value_noise(along / 12.0, across / 1.0, 1.0, seed, 42)  # long thin streaks
            fibres = np.clip((fibres - 0.30) * 1.8, 0.0, 1.0)
            cov, tag = _nuclei(u, v, _STROMA_NUCLEI, seed, edge, angle=angle)
            h = 0.06 + cov * (0.9 + 0.4 * tag)
            e = 0.20 + 0.75 * fibres
        hema[where] = h
        eosin[where] = e

    hema *= h_strength
    eosin *= e_strength
    od = hema[..., None] * _OD_H + eosin[..., None] * _OD_E  # [H,W,3]
    rgb = 255.0 * np.exp(-od) * 0.985
    # White background: paper white with a faint tint, no stain.
    bg = labels == num_classes
    rgb[bg] = np.array([244.0, 242.0, 245.0], dtype=np.float32)
    # Sensor noise, a pure function of the global pixel position.
    noise = (_hash_uniform(px, py, seed, 77) - 0.5) * 10.0
    rgb += noise[..., None]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), labels


def render_tissue(height: int, width: int, *, seed: int, num_classes: int = 4,
                  mpp: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """An H&E-like tissue image and its exact class map.

    Returns rgb uint8 [H,W,3] and labels uint8 [H,W] (0..K-1 tissue, K = background index).
    Deterministic in (height, width, seed, num_classes, mpp).  Default mpp 1.0 matches the
    10x patches of LUAD-HistoSeg.
    """
    return render_window(0, 0, height, width, seed=seed, num_classes=num_classes, mpp=mpp)


def render_labels_window(x0: int, y0: int, height: int, width: int, *, seed: int, num_classes: int = 4,
                         mpp: float = 1.0) -> np.ndarray:
    """Only the class map [H,W] uint8 of render_window (same values, much cheaper)."""
    _check_num_classes(num_classes)
    px = np.arange(x0, x0 + width, dtype=np.int64)[None, :]
    py = np.arange(y0, y0 + height, dtype=np.int64)[:, None]
    return _region_labels((px + 0.5) * mpp, (py + 0.5) * mpp, int(seed), num_classes)
