"""Toyshift: procedurally generated shapes rendered in four domains (numpy + PIL only).

Each class is a closed outline drawn from one of a few families (Fourier blob, star, polygon,
ring, crescent, polyomino), chosen from the seed and kept only if it differs clearly from every
class already made. An image is one instance of a class (small jitter of its coefficients, random
scale, position, aspect and rotation within ±25°) rendered in a domain: photo-like `real`,
flat `clipart`, pencil `sketch` or brush-stroke `painting`. Colour, texture and position are drawn
independently of the label, so the outline is the only signal that names the class.

Every (file, split, domain) is generated from its own seed stream, so one seed always gives the
same arrays and changing the size of one split leaves every other split untouched.

The files' format, and reading them, is `toyshift_format` (small; no generator).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# The file format, and its readers re-exported: `toyshift.read_split` etc. keep working here.
from robustft.data.toyshift_format import (
    BASELINE_SPLIT,
    DOMAINS,
    FORMAT,
    FORMAT_VERSION,
    ImageSplit,
    class_names,
    list_splits,
    read_metadata,
    read_split,
    write_splits,
)

__all__ = [
    "BASELINE_SPLIT",
    "DEFAULT_PRETRAIN_IMAGES_PER_CLASS",
    "DOMAINS",
    "FORMAT",
    "FORMAT_VERSION",
    "ImageSplit",
    "class_names",
    "generate_toyshift",
    "list_splits",
    "read_metadata",
    "read_split",
    "write_toyshift",
]

log = logging.getLogger(__name__)

DEFAULT_PRETRAIN_IMAGES_PER_CLASS: Mapping[str, int] = {
    "real": 400,
    "clipart": 200,
    "painting": 200,
    "sketch": 150,
}

_SS = 4  # supersampling factor: outlines are drawn at 4x and box-filtered down (antialiasing)
_CHUNK = 256  # images per seed stream inside a split: bounds memory, fixes the RNG layout
# Families in the order classes draw them: those with room for many distinct members recur more
# often than the narrow ones (ring, crescent), and any 10 consecutive classes include every
# family, so the pretraining and task classes come from the same mix.
_FAMILIES = (
    "blob",
    "polyomino",
    "star",
    "polygon",
    "ring",
    "blob",
    "crescent",
    "polyomino",
    "star",
    "polygon",
)
# Largest soft IoU allowed between two classes (blurred masks, best relative rotation);
# instances of one class overlap about 0.9 by the same measure.
_MAX_OVERLAP = 0.72
_MAX_ROTATION = math.radians(25.0)
# Scales every per-instance jitter of the class coefficients: the knob for how hard the task is
# (at 1.0 a ResNet reaches about 99% ID accuracy, too close to the ceiling to compare methods).
_JITTER = 1.6


# --------------------------------------------------------------------------- seeds


def _seed_sequence(seed: int, *names: str) -> np.random.SeedSequence:
    # Hash the names into the entropy: each stream depends on its own name only, never on how
    # many numbers another split drew.
    digest = hashlib.sha256("/".join(names).encode()).digest()
    words = np.frombuffer(digest[:16], dtype="<u4").tolist()
    return np.random.SeedSequence([seed, *words])


# --------------------------------------------------------------------------- shape classes


@dataclass(frozen=True)
class _ShapeClass:
    family: str
    params: dict[str, Any] = field(hash=False)


def _sample_class(rng: np.random.Generator, family: str) -> _ShapeClass:
    if family == "blob":
        amps = np.zeros(5)
        dominant = int(rng.integers(2, 7))
        amps[dominant - 2] = rng.uniform(0.22, 0.36) if dominant <= 3 else rng.uniform(0.14, 0.24)
        others = [k for k in range(2, 7) if k != dominant]
        for k in rng.choice(others, size=int(rng.integers(1, 3)), replace=False):
            amps[k - 2] = rng.uniform(0.05, 0.12)
        return _ShapeClass(family, {"amps": amps, "phases": rng.uniform(0, 2 * np.pi, 5)})
    if family == "star":
        n = int(rng.integers(3, 9))
        # Valleys well inside the inradius of the n-gon, or a star looks like a polygon.
        inner = math.cos(math.pi / n) * rng.uniform(0.45, 0.75)
        return _ShapeClass(family, {"n": n, "inner": inner, "phase": rng.uniform(0, 2 * np.pi / n)})
    if family == "polygon":
        n = int(rng.choice([3, 4, 4, 5, 5, 6]))  # triangles differ least from each other
        return _ShapeClass(
            family,
            {
                "n": n,
                "offsets": rng.uniform(-0.45, 0.45, n) * np.pi / n,
                "radii": rng.uniform(0.6, 1.0, n),
                "phase": rng.uniform(0, 2 * np.pi / n),
            },
        )
    if family == "ring":
        outer = int(rng.choice([0, 4, 5, 6]))
        inradius = 1.0 if outer == 0 else math.cos(math.pi / outer)
        hole_radius = rng.uniform(0.36, 0.5)
        reach = max(0.0, 0.78 * inradius - hole_radius)
        direction = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(0.0, reach) * np.array([math.cos(direction), math.sin(direction)])
        return _ShapeClass(
            family,
            {
                "outer": outer,
                "outer_phase": rng.uniform(0, 2 * np.pi),
                "hole": int(rng.choice([0, 3, 4])),
                "hole_phase": rng.uniform(0, 2 * np.pi),
                "hole_radius": hole_radius,
                "offset": offset,
            },
        )
    if family == "crescent":
        return _ShapeClass(
            family,
            {
                "r": rng.uniform(0.72, 0.95),
                "d": rng.uniform(0.35, 0.62),
                "phase": rng.uniform(0, 2 * np.pi),
            },
        )
    if family == "polyomino":
        return _ShapeClass(family, {"outline": _sample_polyomino(rng)})
    raise ValueError(f"unknown shape family {family!r}")


def _sample_polyomino(rng: np.random.Generator) -> np.ndarray:
    # Grow 4-5 edge-connected cells in a 3x3 grid; retry the rare pinched ones (two cells touching
    # only at a corner), whose boundary is not one simple loop.
    while True:
        cells = {(1, 1)}
        target = int(rng.integers(4, 6))
        while len(cells) < target:
            frontier = sorted(
                {
                    (x + dx, y + dy)
                    for x, y in cells
                    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))
                    if 0 <= x + dx < 3 and 0 <= y + dy < 3
                }
                - cells
            )
            cells.add(frontier[int(rng.integers(len(frontier)))])
        loop = _cells_outline(cells)
        if loop is not None:
            return loop


def _cells_outline(cells: set[tuple[int, int]]) -> np.ndarray | None:
    edges: dict[tuple[int, int], tuple[int, int]] = {}
    directed = set()
    for x, y in cells:
        corners = [(x, y), (x + 1, y), (x + 1, y + 1), (x, y + 1)]
        for a, b in zip(corners, corners[1:] + corners[:1], strict=True):
            directed.add((a, b))
    boundary = [(a, b) for a, b in directed if (b, a) not in directed]
    for a, b in boundary:
        if a in edges:
            return None  # pinch vertex
        edges[a] = b
    start = min(edges)
    loop = [start]
    while (nxt := edges[loop[-1]]) != start:
        loop.append(nxt)
    if len(loop) != len(edges):
        return None
    pts = np.array(loop, dtype=float)
    # Drop collinear vertices so jitter moves corners, not points in the middle of an edge.
    prev, nxt_pts = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts - prev)[:, 0] * (nxt_pts - pts)[:, 1] - (pts - prev)[:, 1] * (nxt_pts - pts)[:, 0]
    return pts[np.abs(cross) > 1e-9]


def _polar(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    radii, angles = np.broadcast_arrays(radii, angles)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


def _class_contours(
    shape: _ShapeClass, rng: np.random.Generator | None, count: int = 1
) -> list[np.ndarray]:
    """`count` instances of a class: outer contour then holes, each an array (count, P, 2).

    Centred on the outer contour's bounding box, max radius 1. With `rng` the class coefficients
    get a small per-instance jitter; without, every instance is the canonical shape. Batched over
    instances because per-call numpy overhead dominates on contours this small.
    """
    p = shape.params

    def jit(scale: float, *size: int) -> np.ndarray:
        if rng is None:
            return np.zeros((count, *size))
        return rng.normal(0.0, scale * _JITTER, (count, *size))

    if shape.family == "blob":
        theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        amps = p["amps"] * (1.0 + jit(0.12, 5))
        phases = p["phases"] + jit(0.25, 5)
        waves = np.cos(np.arange(2, 7)[:, None] * theta + phases[..., None])
        r = np.maximum(1.0 + (amps[..., None] * waves).sum(1), 0.3)
        contours = [_polar(r, theta)]
    elif shape.family == "star":
        n = p["n"]
        angles = p["phase"] + np.pi * np.arange(2 * n) / n
        radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, p["inner"] * (1.0 + jit(0.06, 1)))
        contours = [_polar(radii * (1.0 + jit(0.04, 2 * n)), angles)]
    elif shape.family == "polygon":
        n = p["n"]
        angles = p["phase"] + 2 * np.pi * np.arange(n) / n + p["offsets"] + jit(0.05, n)
        contours = [_polar(p["radii"] * (1.0 + jit(0.04, n)), angles)]
    elif shape.family == "ring":
        k_out = p["outer"] or 48  # 0 sides means a circle
        k_hole = p["hole"] or 32
        a_out = p["outer_phase"] + jit(0.05, 1) + 2 * np.pi * np.arange(k_out) / k_out
        a_hole = p["hole_phase"] + jit(0.1, 1) + 2 * np.pi * np.arange(k_hole) / k_hole
        outer = _polar(1.0 + jit(0.03, k_out), a_out)
        hole = _polar(p["hole_radius"] * (1.0 + jit(0.05, 1)), a_hole)
        contours = [outer, hole + (p["offset"] + jit(0.025, 2))[:, None]]
    elif shape.family == "crescent":
        r = p["r"] + jit(0.025, 1)
        d = p["d"] + jit(0.025, 1)
        x0 = (d * d + 1.0 - r * r) / (2.0 * d)
        y0 = np.sqrt(np.maximum(1.0 - x0 * x0, 1e-6))
        t1, s1 = np.arctan2(y0, x0), np.arctan2(y0, x0 - d)
        u = np.linspace(0.0, 1.0, 40)
        outer_t = t1 + (2 * np.pi - 2 * t1) * u
        inner_t = (2 * np.pi - s1 - (2 * np.pi - 2 * s1) * u)[:, 1:-1]
        inner = _polar(r, inner_t) + np.stack([d, np.zeros_like(d)], axis=-1)
        pts = np.concatenate([_polar(1.0, outer_t), inner], axis=1)
        c, s = math.cos(p["phase"]), math.sin(p["phase"])
        contours = [pts @ np.array([[c, s], [-s, c]])]
    elif shape.family == "polyomino":
        outline = p["outline"]
        contours = [outline + jit(0.06, *outline.shape)]
    else:
        raise ValueError(f"unknown shape family {shape.family!r}")

    outer = contours[0]
    centre = (outer.min(1, keepdims=True) + outer.max(1, keepdims=True)) / 2.0
    scale = np.sqrt(((outer - centre) ** 2).sum(2, keepdims=True)).max(1, keepdims=True)
    return [(c - centre) / scale for c in contours]


def _canonical(shape: _ShapeClass) -> list[np.ndarray]:
    return [c[0] for c in _class_contours(shape, None)]


def _soft_mask(contours: list[np.ndarray], angle: float, size: int = 32) -> np.ndarray:
    """The filled shape, rotated, antialiased and blurred by about one pixel, flattened."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    img = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(img)
    for i, contour in enumerate(contours):
        pts = size + 0.9 * size * (contour @ rot)
        draw.polygon(pts.ravel().tolist(), fill=255 if i == 0 else 0)
    mask = np.asarray(img.reduce(2), dtype=np.float32)[None] / 255.0
    return _blur(mask, 3).ravel()


def _make_classes(seed: int, count: int) -> list[_ShapeClass]:
    """`count` classes, each unlike every earlier one under any rotation the renderer applies.

    Mirror images count as the same shape, so that horizontal-flip augmentation never turns an
    image of one class into a look-alike of another.
    """
    rng = np.random.default_rng(_seed_sequence(seed, "classes"))
    # Two instances may be turned up to twice the largest rotation apart.
    angles = np.linspace(-2 * _MAX_ROTATION, 2 * _MAX_ROTATION, 17)
    classes: list[_ShapeClass] = []
    bank = np.zeros((0, 32 * 32), dtype=np.float32)  # soft masks of the classes so far
    bank_sums = np.zeros(0, dtype=np.float32)
    for index in range(count):
        family = _FAMILIES[index % len(_FAMILIES)]
        attempt = 0
        while True:
            candidate = _sample_class(rng, family)
            contours = _canonical(candidate)
            mask = _soft_mask(contours, 0.0)
            # Relax the bar slowly if a family runs out of distinct members (very many classes).
            limit = _MAX_OVERLAP + 0.01 * (attempt // 50)
            if not len(bank) or _max_overlap(mask, bank, bank_sums) < limit:
                break
            attempt += 1
        classes.append(candidate)
        mirrored = [c * np.array([-1.0, 1.0]) for c in contours]
        block = np.stack([_soft_mask(cs, a) for cs in (contours, mirrored) for a in angles])
        bank = np.concatenate([bank, block])
        bank_sums = np.concatenate([bank_sums, block.sum(1)])
    return classes


def _max_overlap(mask: np.ndarray, bank: np.ndarray, bank_sums: np.ndarray) -> float:
    """Largest soft IoU (sum of minima over sum of maxima) between `mask` and a row of `bank`."""
    inter = np.minimum(bank, mask).sum(1)
    union = bank_sums + mask.sum() - inter  # the sum of maxima, without a second pass
    return float((inter / np.maximum(union, 1e-6)).max())


# --------------------------------------------------------------------------- array helpers


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB in [0, 1], shape (..., 3)."""
    h = np.mod(h, 1.0)[..., None]
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h * 6.0, 6.0)
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (v[..., None] - v[..., None] * s[..., None] * ramp).astype(np.float32)


def _downsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Box filter over the last two axes (strided sums: much faster than reshape-mean)."""
    total = sum(
        a[..., i::factor, j::factor].astype(np.float32)
        for i in range(factor)
        for j in range(factor)
    )
    return total / (factor * factor)


def _reduce(images: list[Image.Image], factor: int) -> np.ndarray:
    """Box-filter a list of "L" images by `factor` (PIL, in C) into floats in [0, 1]."""
    return np.stack([np.asarray(im.reduce(factor)) for im in images]).astype(np.float32) / 255.0


def _blur(x: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over the last two axes."""
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    for _ in range(passes):
        p = np.pad(x, pad, mode="edge")
        x = (p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]) * 0.25
        x = (x[..., :-2] + 2 * x[..., 1:-1] + x[..., 2:]) * 0.25
    return x


def _interp_matrix(cells: int, size: int) -> np.ndarray:
    # Smoothstep interpolation weights from `cells + 1` lattice points to `size` pixels.
    pos = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(pos.astype(int), cells - 1)
    t = pos - i
    t = t * t * (3 - 2 * t)
    m = np.zeros((size, cells + 1), dtype=np.float32)
    m[np.arange(size), i] = 1 - t
    m[np.arange(size), i + 1] = t
    return m


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance uniform noise: a third of the cost of normal variates."""
    return (rng.random(shape, dtype=np.float32) - 0.5) * np.float32(math.sqrt(12.0))


def _fractal(rng: np.random.Generator, n: int, size: int, octaves: Iterable[int]) -> np.ndarray:
    """Value noise summed over lattice sizes, roughly unit variance, shape (n, size, size)."""
    total = np.zeros((n, size, size), dtype=np.float32)
    norm = 0.0
    for level, cells in enumerate(octaves):
        weight = 0.55**level
        m = _interp_matrix(cells, size)
        grid = _noise(rng, (n, cells + 1, cells + 1))
        total += weight * (m @ grid @ m.T)
        norm += weight * weight
    return total / math.sqrt(norm) * 1.6  # smoothstep interpolation shrinks the variance


def _shift(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Translate each image of a batch by whole pixels, filling with zeros."""
    out = np.zeros_like(x)
    size = x.shape[1]

    def spans(d: int) -> tuple[slice, slice]:
        if d >= 0:
            return slice(0, size - d), slice(d, size)
        return slice(-d, size), slice(0, size + d)

    for i, (sy, sx) in enumerate(zip(dy.tolist(), dx.tolist(), strict=True)):
        (ys, yd), (xs, xd) = spans(sy), spans(sx)
        out[i, yd, xd] = x[i, ys, xs]
    return out


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/reflections of a square array."""
    a = np.rot90(a, k % 4)
    return a.T if k >= 4 else a


def _resample_closed(contour: np.ndarray, spacing: float) -> np.ndarray:
    """Points evenly spaced along a closed polyline."""
    closed = np.concatenate([contour, contour[:1]])
    seg = np.sqrt((np.diff(closed, axis=0) ** 2).sum(1))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    count = max(int(cum[-1] / spacing), 8)
    at = np.linspace(0.0, cum[-1], count, endpoint=False)
    return np.stack([np.interp(at, cum, closed[:, 0]), np.interp(at, cum, closed[:, 1])], axis=1)


def _closed_line(draw: ImageDraw.ImageDraw, pts: np.ndarray, width: int, fill: int) -> None:
    draw.line(np.concatenate([pts, pts[:1]]).ravel().tolist(), fill, width)
    # Round only the sharp corners: PIL's joint="curve" rounds every vertex in Python (slow).
    a = pts - np.roll(pts, 1, axis=0)
    b = np.roll(pts, -1, axis=0) - pts
    cos = (a * b).sum(1) / np.maximum(np.hypot(*a.T) * np.hypot(*b.T), 1e-9)
    r = width / 2
    for x, y in pts[cos < 0.94].tolist():
        draw.ellipse((x - r, y - r, x + r, y + r), fill)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Instances:
    """A chunk of posed shapes, ready for a domain renderer."""

    # Per class present: the image indices and its contours (outer, then holes), each an array
    # (len(indices), P, 2) in supersampled pixels. Batched for the same reason as the contours.
    groups: list[tuple[np.ndarray, list[np.ndarray]]]
    masks: list[Image.Image]  # per image: the filled shape, "L" at _SS times the output size
    cx: np.ndarray  # centre, output pixels
    cy: np.ndarray
    radius: np.ndarray  # radius of the circle holding the shape, output pixels
    size: int

    def __len__(self) -> int:
        return len(self.cx)

    def contours(self) -> list[list[np.ndarray]]:
        """Per image: outer contour then holes, each (P, 2)."""
        out: list[list[np.ndarray]] = [[] for _ in range(len(self))]
        for indices, batch in self.groups:
            for j, i in enumerate(indices.tolist()):
                out[i] = [c[j] for c in batch]
        return out


def _render_chunk(
    *,
    rng: np.random.Generator,
    shapes: list[_ShapeClass],
    labels: np.ndarray,
    domain: str,
    size: int,
) -> np.ndarray:
    n = len(labels)
    big = size * _SS
    # Pose is drawn independently of the label: only the outline may identify the class.
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, n)
    radius = rng.uniform(0.27, 0.44, n) * size
    aspect = np.exp(rng.uniform(-0.15, 0.15, n))
    room = np.maximum(size / 2 - radius * 1.16 - 0.5, 0.0)
    cx = size / 2 + rng.uniform(-1, 1, n) * room
    cy = size / 2 + rng.uniform(-1, 1, n) * room
    # Row-vector transform per image: stretch, rotate, scale to supersampled pixels.
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.stack(
        [np.stack([aspect * c, aspect * s], -1), np.stack([-s, c], -1) / aspect[:, None]], 1
    )
    matrix *= (radius * _SS)[:, None, None]
    offset = np.stack([cx, cy], axis=1)[:, None, :] * _SS

    groups = []
    for label in np.unique(labels).tolist():
        idx = np.flatnonzero(labels == label)
        batch = _class_contours(shapes[label], rng, len(idx))
        groups.append((idx, [cc @ matrix[idx] + offset[idx] for cc in batch]))
    shots = _Instances(groups, [], cx, cy, radius, size)
    for pts in shots.contours():
        img = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(img)
        for j, cc in enumerate(pts):
            draw.polygon(cc.ravel().tolist(), fill=255 if j == 0 else 0)
        shots.masks.append(img)

    # Renderers work channel-first (n, 3, H, W): numpy broadcasts a per-pixel map over channels
    # far faster than over a trailing axis of length 3.
    rgb = _RENDERERS[domain](rng, shots)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _col(a: np.ndarray) -> np.ndarray:
    """Per-image scalars shaped to broadcast against maps (n, H, W)."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def _rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-image colours shaped (n, 3, 1, 1)."""
    return _hsv(h, s, v)[:, :, None, None]


def _render_real(rng: np.random.Generator, shots: _Instances) -> np.ndarray:
    """Shaded object with a soft shadow over a textured, naturally coloured background."""
    n, size = len(shots), shots.size
    alpha = _reduce(shots.masks, _SS)
    yy, xx = _grid(size)

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n)

    hue = rng.random(n)
    c1 = _rgb(hue, u(0.15, 0.6), u(0.2, 0.6))
    c2 = _rgb(hue + u(-0.12, 0.12), u(0.1, 0.5), u(0.5, 0.95))
    t = np.clip(0.5 + 0.5 * _col(u(0.8, 1.8)) * _fractal(rng, n, size, (2, 4, 8)), 0, 1)
    light = rng.uniform(0, 2 * np.pi, n)
    lx, ly = _col(np.cos(light)), _col(np.sin(light))
    # Brightness of the background: fine grain, an illumination ramp, a soft shadow cast away
    # from the light.
    grain = 1.0 + _col(u(0.03, 0.12)) * _fractal(rng, n, size, (16, 32))
    ramp = 1.0 + _col(u(0.1, 0.5)) * ((xx - size / 2) * lx + (yy - size / 2) * ly) / size
    dx = np.rint(-np.cos(light) * u(0.8, 2.2)).astype(int)
    dy = np.rint(-np.sin(light) * u(0.8, 2.2)).astype(int)
    shadow = 1.0 - _col(u(0.25, 0.55)) * _blur(_shift(alpha, dy, dx), 2)
    bg = (c1 + (c2 - c1) * t[:, None]) * (grain * ramp * shadow)[:, None]

    # The object: hue kept away from the background's so that it stays visible.
    base = _rgb(hue + u(0.2, 0.8), u(0.35, 0.9), u(0.5, 0.95))
    cx, cy, r = _col(shots.cx), _col(shots.cy), _col(shots.radius)
    shade = 1.0 + _col(u(0.3, 0.6)) * ((xx - cx) * lx + (yy - cy) * ly) / r
    shade = np.clip(shade * (1.0 + 0.06 * _fractal(rng, n, size, (4, 8))), 0.3, 1.6)
    hx, hy = cx + 0.45 * r * lx, cy + 0.45 * r * ly
    spot = _col(u(0.2, 0.6)) * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.3 * r) ** 2))
    fg = base * shade[:, None]
    fg = fg + (1.0 - fg) * spot[:, None]

    a = alpha[:, None]
    img = _blur(bg + (fg - bg) * a, 1)  # a camera's softness
    noise = _noise(rng, img.shape)
    return img + _col(u(0.01, 0.03))[:, None] * noise


def _render_clipart(rng: np.random.Generator, shots: _Instances) -> np.ndarray:
    """Flat saturated fill, thick dark outline, plain light background."""
    n, big = len(shots), shots.size * _SS

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n)

    widths = np.rint(u(1.2, 2.2) * _SS).astype(int).tolist()
    lines = []
    for pts, width in zip(shots.contours(), widths, strict=True):
        img = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(img)
        for cc in pts:
            _closed_line(draw, cc, width, 255)
        lines.append(img)
    alpha = _reduce(shots.masks, _SS)[:, None]
    line = _reduce(lines, _SS)[:, None]

    bg = _rgb(rng.random(n), u(0.0, 0.25), u(0.88, 1.0))
    hue = rng.random(n)
    fill = _rgb(hue, u(0.65, 1.0), u(0.75, 1.0))
    ink = _rgb(hue, u(0.3, 0.9), u(0.0, 0.25))
    img = bg + (fill - bg) * alpha
    return img + (ink - img) * line


def _hatch_bank(rng: np.random.Generator, big: int, count: int) -> np.ndarray:
    """Layers of parallel pencil lines (uint8 tone), twice the image size so crops vary."""
    side = 2 * big
    bank = np.empty((count, side, side), dtype=np.uint8)
    for k in range(count):
        layer = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(layer)
        theta = rng.uniform(0, np.pi)
        c, s = math.cos(theta), math.sin(theta)
        tone = int(rng.integers(70, 160))
        for d in np.arange(-side, side, rng.uniform(2.0, 3.2) * _SS).tolist():
            px, py = side / 2 - s * d, side / 2 + c * d
            draw.line([(px - c * side, py - s * side), (px + c * side, py + s * side)], tone, 2)
        bank[k] = np.asarray(layer)
    return bank


def _subdivide(contour: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertex indices and weights that resample a closed contour about every `spacing`."""
    nxt = np.roll(contour, -1, axis=0)
    parts = np.maximum(np.rint(np.hypot(*(nxt - contour).T) / spacing).astype(int), 1)
    i0 = np.repeat(np.arange(len(contour)), parts)
    starts = np.repeat(np.cumsum(parts) - parts, parts)
    t = (np.arange(len(i0)) - starts) / np.repeat(parts, parts)
    return i0, (i0 + 1) % len(contour), t


def _render_sketch(rng: np.random.Generator, shots: _Instances) -> np.ndarray:
    """Grey pencil outline: thin, wobbly, sometimes doubled or broken, some hatching; no fill."""
    n, size = len(shots), shots.size
    big = size * _SS
    passes = np.where(rng.random(n) < 0.5, 2, 1).tolist()
    # Wobbly strokes, batched per class: resample every outline about every 1.2 output pixels
    # (the scheme comes from the first instance; the others differ only by jitter) and push each
    # point along the normal by a smooth random wave plus a little tremor.
    paths: list[list[np.ndarray]] = [[] for _ in range(n)]
    for indices, batch in shots.groups:
        m = len(indices)
        for cc in batch:
            i0, i1, t = _subdivide(cc[0], 1.2 * _SS)
            ring = cc[:, i0] * (1 - t)[:, None] + cc[:, i1] * t[:, None]
            q = ring.shape[1]
            tangent = np.roll(ring, -1, axis=1) - np.roll(ring, 1, axis=1)
            length = np.maximum(np.hypot(tangent[..., 0], tangent[..., 1]), 1e-6)
            normal = np.stack([-tangent[..., 1], tangent[..., 0]], axis=-1) / length[..., None]
            phase = np.arange(q) / q * 2 * np.pi
            freq = rng.integers(2, 6, (2, m, 2, 1))
            amp = rng.uniform(0.15, 0.55, (2, m, 2, 1)) * _SS
            off = rng.uniform(0, 2 * np.pi, (2, m, 2, 1))
            wobble = (amp * np.sin(freq * phase + off)).sum(2)
            wobble += rng.normal(0.0, 0.12 * _SS, (2, m, q))
            drawn = ring[None] + normal[None] * wobble[..., None]
            for j, i in enumerate(indices.tolist()):
                paths[i].extend(drawn[p, j] for p in range(passes[i]))

    hatches = _hatch_bank(rng, big, 6)
    widths = rng.integers(2, 6, n).tolist()  # 0.5–1.25 output pixels
    hatched = (rng.random(n) < 0.5).tolist()
    strokes = []
    for i in range(n):
        img = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(img)
        for path in paths[i]:
            q = len(path)
            # Start anywhere and overshoot the start a little, as a hand does.
            start, over, tone = rng.integers((q, 4, 86), size=3, dtype=np.int64).tolist()
            path = path[(start + np.arange(q + over)) % q]
            for piece in _break(rng, path):
                draw.line(piece.ravel().tolist(), 170 + tone, widths[i])
        if hatched[i]:
            # Hatching: a random crop of a line layer, kept inside the shape.
            k, oy, ox = rng.integers((len(hatches), big, big), size=3, dtype=np.int64).tolist()
            hatch = np.minimum(hatches[k, oy : oy + big, ox : ox + big], np.asarray(shots.masks[i]))
            img = Image.fromarray(np.maximum(np.asarray(img), hatch))
        strokes.append(img)
    alpha = _reduce(strokes, _SS)

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n)

    paper = _col(u(0.86, 0.99)) + 0.012 * _fractal(rng, n, size, (8, 16, 32))
    graphite = _col(u(0.05, 0.35))
    grey = paper + (graphite - paper) * np.clip(alpha * 1.3, 0, 1)
    return np.repeat(grey[:, None], 3, axis=1)


def _break(rng: np.random.Generator, path: np.ndarray) -> list[np.ndarray]:
    """Split a stroke at 0–2 short gaps."""
    m = len(path)
    gaps = int(rng.integers(4)) - 1  # -1 and 0: unbroken
    if gaps <= 0 or m < 12:
        return [path]
    cuts = np.sort(rng.integers(3, m - 3, gaps)).tolist()
    pieces, begin = [], 0
    for cut in cuts:
        if cut - begin >= 2:
            pieces.append(path[begin:cut])
        begin = max(begin, cut + 2)
    if m - begin >= 2:
        pieces.append(path[begin:])
    return pieces


def _stroke_bank(
    rng: np.random.Generator,
    *,
    side: int,
    count: int,
    strokes: int,
    length: tuple[float, float],
    width: tuple[int, int],
) -> np.ndarray:
    """Maps of brush strokes (uint8 stroke index, 0 = canvas), one dominant direction each.

    Images take random crops, rotations and colourings of these maps: one PIL call per stroke
    per chunk instead of per image.
    """
    bank = np.empty((count, side, side), dtype=np.uint8)
    for k in range(count):
        layer = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(layer)
        x, y = rng.uniform(-4, side + 4, (2, strokes))
        angle = rng.uniform(0, np.pi) + rng.normal(0, 0.4, strokes)
        half = rng.uniform(*length, strokes) / 2
        dx, dy = np.cos(angle) * half, np.sin(angle) * half
        segments = np.stack([x - dx, y - dy, x + dx, y + dy], axis=1).tolist()
        widths = rng.integers(width[0], width[1] + 1, strokes).tolist()
        for index, (seg, w) in enumerate(zip(segments, widths, strict=True)):
            draw.line(seg, 1 + index % 255, w)
        bank[k] = np.asarray(layer)
    return bank


def _crop_bank(rng: np.random.Generator, bank: np.ndarray, n: int, side: int) -> np.ndarray:
    out = np.empty((n, side, side), dtype=np.uint8)
    picks = rng.integers(len(bank), size=n).tolist()
    offsets = rng.integers(0, bank.shape[1] - side + 1, (n, 2)).tolist()
    flips = rng.integers(8, size=n).tolist()
    for i, (k, (oy, ox), f) in enumerate(zip(picks, offsets, flips, strict=True)):
        out[i] = _dihedral(bank[k, oy : oy + side, ox : ox + side], f)
    return out


def _lookup(lut: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Per-image colour lookup: lut (n, 256, 3), index (n, H, W) uint8 → (n, 3, H, W)."""
    flat = index.astype(np.intp) + 256 * np.arange(len(index))[:, None, None]
    table = lut.reshape(-1, 3).astype(np.float32)
    return np.stack([np.take(table[:, c], flat) for c in range(3)], axis=1)


def _render_painting(rng: np.random.Generator, shots: _Instances) -> np.ndarray:
    """Brush strokes everywhere: a colourful background and a blotchy fill, then blurred."""
    n, size = len(shots), shots.size
    mid = size * 2  # strokes are drawn at 2x
    strokes = 4 * 90  # a bank map is 4 times the area of an image
    back_bank = _stroke_bank(
        rng, side=2 * mid, count=6, strokes=strokes, length=(6, 18), width=(4, 8)
    )
    front_bank = _stroke_bank(
        rng, side=2 * mid, count=6, strokes=strokes, length=(5, 12), width=(3, 6)
    )
    rows = np.arange(n)[:, None]

    # Background: three hues around a random one; every stroke takes one, slightly varied.
    hue0 = rng.random(n)
    pal = _hsv(
        hue0[:, None] + rng.uniform(-0.15, 0.15, (n, 3)),
        rng.uniform(0.35, 0.85, (n, 3)),
        rng.uniform(0.45, 1.0, (n, 3)),
    )
    back_lut = pal[rows, rng.integers(0, 3, (n, 256))] * rng.uniform(0.85, 1.15, (n, 256, 1))
    back = _lookup(back_lut, _crop_bank(rng, back_bank, n, mid))

    # Object: a base colour away from the background hue, strokes of nearby colours.
    fg_h = hue0 + rng.uniform(0.33, 0.67, n)
    fg_s, fg_v = rng.uniform(0.5, 0.95, n), rng.uniform(0.5, 1.0, n)
    front_lut = _hsv(
        fg_h[:, None] + rng.normal(0, 0.03, (n, 256)),
        np.clip(fg_s[:, None] + rng.normal(0, 0.08, (n, 256)), 0, 1),
        np.clip(fg_v[:, None] + rng.normal(0, 0.1, (n, 256)), 0, 1),
    )
    front_lut[:, 0] = _hsv(fg_h, fg_s, fg_v)
    front = _lookup(front_lut, _crop_bank(rng, front_bank, n, mid))

    alpha = _reduce(shots.masks, _SS // 2)[:, None]
    return _blur(_downsample(back + (front - back) * alpha, 2), 1)


_Renderer = Callable[[np.random.Generator, _Instances], np.ndarray]
_RENDERERS: dict[str, _Renderer] = {
    "real": _render_real,
    "clipart": _render_clipart,
    "sketch": _render_sketch,
    "painting": _render_painting,
}


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Job:
    file: str  # "pretrain" or "task"
    split: str
    domain: str
    per_class: int


def _generate_split(
    *,
    seed: int,
    job: _Job,
    shapes: list[_ShapeClass],
    size: int,
    tick: Callable[[int], None],
) -> ImageSplit:
    ss = _seed_sequence(seed, job.file, job.split, job.domain)
    order_rng, chunk_seeds = np.random.default_rng(ss), ss.spawn(1)[0]
    labels = np.repeat(np.arange(len(shapes), dtype=np.int64), job.per_class)
    labels = order_rng.permutation(labels)
    count = len(labels)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    # One stream per fixed-size chunk: the layout of random draws does not depend on batching.
    streams = chunk_seeds.spawn(max(1, -(-count // _CHUNK)))
    for k, start in enumerate(range(0, count, _CHUNK)):
        stop = min(start + _CHUNK, count)
        images[start:stop] = _render_chunk(
            rng=np.random.default_rng(streams[k]),
            shapes=shapes,
            labels=labels[start:stop],
            domain=job.domain,
            size=size,
        )
        tick(stop - start)
    domains = np.full(count, DOMAINS.index(job.domain), dtype=np.int64)
    return ImageSplit(images=images, labels=labels, domains=domains)


def _concat_shuffled(parts: list[ImageSplit], rng: np.random.Generator) -> ImageSplit:
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    domains = np.concatenate([p.domains for p in parts])
    perm = rng.permutation(len(labels))
    return ImageSplit(images=images[perm], labels=labels[perm], domains=domains[perm])


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _plan(
    *,
    pretrain_images_per_class: Mapping[str, int],
    pretrain_val_fraction: float,
    id_domain: str,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    ood_per_class: int,
    baseline_per_class: int,
) -> tuple[list[_Job], list[_Job]]:
    pretrain_jobs: list[_Job] = []
    for domain in DOMAINS:
        total = int(pretrain_images_per_class.get(domain, 0))
        val = round(total * pretrain_val_fraction) if total else 0
        if total and pretrain_val_fraction > 0:
            val = max(val, 1)
        pretrain_jobs.append(_Job("pretrain", "train", domain, total - val))
        pretrain_jobs.append(_Job("pretrain", "val", domain, val))
    task_jobs = [
        _Job("task", "train", id_domain, train_per_class),
        _Job("task", "val", id_domain, val_per_class),
        _Job("task", "test", id_domain, test_per_class),
    ]
    task_jobs += [_Job("task", d, d, ood_per_class) for d in DOMAINS if d != id_domain]
    if baseline_per_class:
        # Last, and from a stream of its own name: adding the pool changes no other split.
        task_jobs.append(_Job("task", BASELINE_SPLIT, id_domain, baseline_per_class))
    return pretrain_jobs, task_jobs


def generate_toyshift(
    *,
    seed: int,
    image_size: int = 32,
    pretrain_classes: int = 20,
    task_classes: int = 12,
    pretrain_images_per_class: Mapping[str, int] | None = None,
    id_domain: str = "sketch",
    train_per_class: int = 150,
    val_per_class: int = 50,
    test_per_class: int = 100,
    ood_per_class: int = 100,
    baseline_per_class: int = 0,
    pretrain_val_fraction: float = 0.05,
    progress: bool = False,
) -> tuple[dict[str, ImageSplit], dict[str, ImageSplit]]:
    """Generate (pretrain_splits, task_splits).

    pretrain: "train" (all domains, shuffled) and "val" (`pretrain_val_fraction` of each domain's
    `pretrain_images_per_class`, carved out of it). task: "train", "val", "test" in `id_domain`,
    then one test-only split per other domain, named by the domain, then, when
    `baseline_per_class` > 0, `BASELINE_SPLIT`: that many more `id_domain` images per class,
    drawn independently of every other split, for the baseline models of effective robustness
    only (models trained from scratch need far more ID images than the 150 per class fine-tuning
    gets to span the ID accuracies of the fine-tuned ones). Task labels run over
    0..task_classes-1, pretrain labels over 0..pretrain_classes-1; the two class sets are
    disjoint shapes from the same generator.
    """
    _check_count("seed", seed, 0)
    _check_count("image_size", image_size, 8)
    _check_count("pretrain_classes", pretrain_classes, 1)
    _check_count("task_classes", task_classes, 1)
    for name, value in (
        ("train_per_class", train_per_class),
        ("val_per_class", val_per_class),
        ("test_per_class", test_per_class),
        ("ood_per_class", ood_per_class),
        ("baseline_per_class", baseline_per_class),
    ):
        _check_count(name, value, 0)
    if id_domain not in DOMAINS:
        raise ValueError(f"id_domain must be one of {DOMAINS}, got {id_domain!r}")
    per_domain = dict(
        DEFAULT_PRETRAIN_IMAGES_PER_CLASS
        if pretrain_images_per_class is None
        else pretrain_images_per_class
    )
    unknown = sorted(set(per_domain) - set(DOMAINS))
    if unknown:
        raise ValueError(f"pretrain_images_per_class: unknown domains {unknown}; use {DOMAINS}")
    for domain, value in per_domain.items():
        _check_count(f"pretrain_images_per_class[{domain!r}]", value, 0)
    if not 0.0 <= pretrain_val_fraction < 1.0:
        raise ValueError(f"pretrain_val_fraction must be in [0, 1), got {pretrain_val_fraction}")

    started = time.perf_counter()
    shapes = _make_classes(seed, pretrain_classes + task_classes)
    pre_shapes, task_shapes = shapes[:pretrain_classes], shapes[pretrain_classes:]
    pretrain_jobs, task_jobs = _plan(
        pretrain_images_per_class=per_domain,
        pretrain_val_fraction=pretrain_val_fraction,
        id_domain=id_domain,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        ood_per_class=ood_per_class,
        baseline_per_class=baseline_per_class,
    )
    total = sum(j.per_class for j in pretrain_jobs) * pretrain_classes
    total += sum(j.per_class for j in task_jobs) * task_classes

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="toyshift")

    def tick(k: int) -> None:
        if bar is not None:
            bar.update(k)

    try:
        pretrain: dict[str, ImageSplit] = {}
        for split in ("train", "val"):
            parts = [
                _generate_split(seed=seed, job=j, shapes=pre_shapes, size=image_size, tick=tick)
                for j in pretrain_jobs
                if j.split == split
            ]
            shuffle = np.random.default_rng(_seed_sequence(seed, "pretrain", split, "order"))
            pretrain[split] = _concat_shuffled(parts, shuffle)
        task = {
            j.split: _generate_split(
                seed=seed, job=j, shapes=task_shapes, size=image_size, tick=tick
            )
            for j in task_jobs
        }
    finally:
        if bar is not None:
            bar.close()
    log.info(
        "toyshift: generated %d images (%dx%d) in %.1f s",
        total,
        image_size,
        image_size,
        time.perf_counter() - started,
    )
    return pretrain, task


# --------------------------------------------------------------------------- writing


def write_toyshift(
    *, pretrain_path: str | Path, task_path: str | Path, seed: int, **kwargs: Any
) -> None:
    """Generate (keywords as for `generate_toyshift`) and write the two HDF5 files.

    Each file is written under a temporary name in its folder and renamed when complete.
    """
    # Bind first, so that a misspelt keyword fails before the generation, not after it.
    bound = inspect.signature(generate_toyshift).bind(seed=seed, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("progress")
    per_domain = params["pretrain_images_per_class"]
    if per_domain is None:
        per_domain = DEFAULT_PRETRAIN_IMAGES_PER_CLASS
    params["pretrain_images_per_class"] = {str(k): int(v) for k, v in per_domain.items()}

    started = time.perf_counter()
    pretrain, task = generate_toyshift(seed=seed, **kwargs)
    generated = time.perf_counter() - started
    n_pre = int(params["pretrain_classes"])
    names = [f"shape{i:02d}" for i in range(n_pre + int(params["task_classes"]))]
    common = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "image_size": int(params["image_size"]),
        "domains": list(DOMAINS),
        # Everything the arrays depend on, for provenance.
        "generator_params": json.dumps(params, sort_keys=True, default=int),
    }
    write_splits(
        path=Path(pretrain_path), splits=pretrain, attrs={**common, "class_names": names[:n_pre]}
    )
    write_splits(
        path=Path(task_path),
        splits=task,
        attrs={**common, "class_names": names[n_pre:], "id_domain": str(params["id_domain"])},
    )
    log.info(
        "toyshift: wrote %s and %s (generation %.1f s, total %.1f s)",
        pretrain_path,
        task_path,
        generated,
        time.perf_counter() - started,
    )
