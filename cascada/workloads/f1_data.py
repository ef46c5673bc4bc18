"""F1 data: 8x8 digits from scikit-learn's bundled ``load_digits``, or generated glyphs.

Three sources, all offline (nothing is ever downloaded):

- ``"sklearn"``: scikit-learn's bundled ``load_digits`` (1797 images, 8x8, intensities 0..16).
  Needs the optional extra ``cascada[sklearn]``.
- ``"glyphs"``: a zero-dependency generator (pure Python, ``random.Random``) that draws ten
  hand-coded digit skeletons with a random affine map (rotation, scale, aspect, shear,
  translation) and stroke thickness onto a 32x32 binary canvas, flips a few pixels as
  speckle noise, and counts the "on" pixels in each 4x4 block, which gives 8x8 images with
  integer intensities 0..16 exactly as ``load_digits`` was made from its 32x32 bitmaps. The
  same seed gives the same images on every platform and Python version.
- ``"cancer"``: scikit-learn's bundled ``load_breast_cancer`` (569 rows, 30 features, binary),
  the window-deferral case of the seed paper. Needs scikit-learn.

``"auto"`` means ``"sklearn"`` when scikit-learn imports and ``"glyphs"`` otherwise.

:func:`load` returns ``(X_train, y_train, X_test, y_test)`` as torch tensors (``float32``
features, ``int64`` labels) with a fixed, seeded split. :func:`load_lists` gives the same
data as plain Python lists, for callers that do not want torch. :func:`perturb` makes
out-of-distribution copies (Gaussian noise, pixel shifts).

torch is imported only inside the functions that return tensors.
"""

from __future__ import annotations

import functools
import math
import random
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "GLYPHS",
    "SOURCES",
    "TEST_FRACTION",
    "Source",
    "feature_count",
    "class_count",
    "glyph_images",
    "have_sklearn",
    "load",
    "load_lists",
    "perturb",
    "resolve_source",
    "resolve_source_name",
]

Source = Literal["auto", "sklearn", "glyphs", "cancer"]
SOURCES: tuple[str, ...] = ("sklearn", "glyphs", "cancer")
TEST_FRACTION = 0.3  # the fixed share of each source held out as the test set
GLYPH_COUNT = 3000  # images the glyph source generates (300 per class)

# Ten digit skeletons, 9 columns x 13 rows. A pixel of the 32x32 canvas is "on" when its
# pre-image under the sample's affine map lies within the sample's stroke thickness of a '#'.
GLYPHS: tuple[tuple[str, ...], ...] = (
    ("..#####..", ".#.....#.", "#.......#", "#.......#", "#.......#", "#.......#", "#.......#",
     "#.......#", "#.......#", "#.......#", "#.......#", ".#.....#.", "..#####.."),
    ("....#....", "...##....", "..#.#....", ".#..#....", "....#....", "....#....", "....#....",
     "....#....", "....#....", "....#....", "....#....", "....#....", "..#####.."),
    ("..#####..", ".#.....#.", "#.......#", "........#", "........#", ".......#.", "......#..",
     ".....#...", "....#....", "...#.....", "..#......", ".#.......", "#########"),
    (".######..", ".......#.", "........#", "........#", ".......#.", "...####..", ".......#.",
     "........#", "........#", "........#", "........#", ".......#.", ".######.."),
    ("......#..", ".....##..", "....#.#..", "...#..#..", "..#...#..", ".#....#..", "#.....#..",
     "#########", "......#..", "......#..", "......#..", "......#..", "......#.."),
    ("#########", "#........", "#........", "#........", "#.#####..", "##.....#.", "........#",
     "........#", "........#", "........#", "#.......#", ".#.....#.", "..#####.."),
    ("...####..", "..#......", ".#.......", "#........", "#........", "#.#####..", "##.....#.",
     "#.......#", "#.......#", "#.......#", "#.......#", ".#.....#.", "..#####.."),
    ("#########", "........#", ".......#.", ".......#.", "......#..", "......#..", ".....#...",
     ".....#...", "....#....", "....#....", "...#.....", "...#.....", "...#....."),
    ("..#####..", ".#.....#.", "#.......#", "#.......#", ".#.....#.", "..#####..", ".#.....#.",
     "#.......#", "#.......#", "#.......#", "#.......#", ".#.....#.", "..#####.."),
    ("..#####..", ".#.....#.", "#.......#", "#.......#", "#.......#", ".#.....##", "..#####.#",
     "........#", "........#", "........#", ".......#.", "......#..", "..####..."),
)

_GW, _GH = 9, 13  # glyph grid, in glyph units
_SUB = 4  # distance-field samples per glyph unit
_MARGIN = 2  # glyph units of distance field around the glyph
# How hard the glyphs are (ranges of the random distortions): chosen so that the linear tier
# is about 84% and the big tier about 95% accurate, harder than load_digits (96% and 99%), so
# that a cascade has work to do and the risk-coverage figures are not all 1.0.
_DISTORT: dict[str, float] = {
    "rot": 18.0, "scale": 0.15, "aspect": 0.2, "shear": 0.4, "shift": 3.0, "thin": 0.6, "thick": 1.7,
    "speckle": 0.05, "wobble": 0.7, "p_occlude": 0.25, "p_clutter": 0.25,
}
_UNIT_PX = 1.95  # canvas pixels per glyph unit at scale 1 (a glyph is about 18x25 of 32x32)


def have_sklearn() -> bool:
    """Return True when scikit-learn can be imported (the ``sklearn`` extra)."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_source(source: str) -> str:
    """Return the concrete source for ``source``: ``"auto"`` becomes ``"sklearn"`` when
    scikit-learn imports, else ``"glyphs"``. Raises ValueError for an unknown name and
    ImportError for a scikit-learn source without scikit-learn."""
    if source == "auto":
        return "sklearn" if have_sklearn() else "glyphs"
    if source not in SOURCES:
        raise ValueError(f"unknown F1 data source {source!r}; expected 'auto' or one of {SOURCES}")
    if source in ("sklearn", "cancer") and not have_sklearn():
        raise ImportError(f"F1 source {source!r} needs scikit-learn (pip install 'cascada[sklearn]'); "
                          "source='glyphs' needs nothing")
    return source


def feature_count(source: str) -> int:
    """Return the number of input features of ``source`` (64 for digits and glyphs, 30 for cancer)."""
    return 30 if resolve_source_name(source) == "cancer" else 64


def class_count(source: str) -> int:
    """Return the number of classes of ``source`` (10 for digits and glyphs, 2 for cancer)."""
    return 2 if resolve_source_name(source) == "cancer" else 10


def resolve_source_name(source: str) -> str:
    """Like :func:`resolve_source` but without requiring scikit-learn for named sources; returns
    the concrete name."""
    if source == "auto":
        return resolve_source(source)
    if source not in SOURCES:
        raise ValueError(f"unknown F1 data source {source!r}; expected 'auto' or one of {SOURCES}")
    return source


@functools.lru_cache(maxsize=None)
def _distance_fields() -> tuple[tuple[float, ...], ...]:
    """Per glyph, a row-major grid of distances (glyph units) from each sample point to the
    nearest '#' centre; the grid spans the glyph plus _MARGIN units on each side."""
    fields = []
    w = (_GW + 2 * _MARGIN) * _SUB + 1
    h = (_GH + 2 * _MARGIN) * _SUB + 1
    for rows in GLYPHS:
        on = [(c + 0.5, r + 0.5) for r, line in enumerate(rows) for c, ch in enumerate(line) if ch == "#"]
        field = []
        for j in range(h):
            v = j / _SUB - _MARGIN
            for i in range(w):
                u = i / _SUB - _MARGIN
                field.append(math.sqrt(min((u - a) ** 2 + (v - b) ** 2 for a, b in on)))
        fields.append(tuple(field))
    return tuple(fields)


def _render(digit: int, rng: random.Random) -> list[int]:
    """One 8x8 image (64 ints in 0..16, row-major) of ``digit`` with random distortions:
    an affine map, a sinusoidal wobble, a stroke thickness, sometimes an erased disc
    (occlusion) and a stray stroke (clutter), then speckle noise."""
    field = _distance_fields()[digit]
    fw = (_GW + 2 * _MARGIN) * _SUB + 1
    fh = (_GH + 2 * _MARGIN) * _SUB + 1
    d = _DISTORT
    rot = math.radians(rng.uniform(-d["rot"], d["rot"]))
    scale = rng.uniform(1.0 - d["scale"], 1.0 + d["scale"]) * _UNIT_PX
    aspect = rng.uniform(1.0 - d["aspect"], 1.0 + d["aspect"])
    shear = rng.uniform(-d["shear"], d["shear"])
    tx, ty = rng.uniform(-d["shift"], d["shift"]), rng.uniform(-d["shift"], d["shift"])
    thick = rng.uniform(d["thin"], d["thick"])
    speckle = rng.uniform(0.0, d["speckle"])
    wob_a, wob_f, wob_p = rng.uniform(0.0, d["wobble"]), rng.uniform(0.3, 0.9), rng.uniform(0.0, 2 * math.pi)
    # Occlusion: an erased disc; clutter: a stray stroke from (ax, ay) to (bx, by), canvas pixels.
    occ = rng.random() < d["p_occlude"]
    ox, oy, orad = rng.uniform(6, 26), rng.uniform(6, 26), rng.uniform(3.0, 6.0)
    clut = rng.random() < d["p_clutter"]
    ax, ay, bx, by = (rng.uniform(0, 32) for _ in range(4))
    cw = rng.uniform(0.8, 1.8)
    seg2 = max((bx - ax) ** 2 + (by - ay) ** 2, 1e-9)
    # Forward map glyph->canvas: p = M @ (g - glyph centre) + canvas centre + t, with
    # M = R @ [[1, shear], [0, 1]] @ diag(scale * aspect, scale); we sample through M^-1.
    sx, sy = scale * aspect, scale
    c, s = math.cos(rot), math.sin(rot)
    m00, m01 = c * sx, (c * shear - s) * sy
    m10, m11 = s * sx, (s * shear + c) * sy
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    cx, cy = 16.0 + tx, 16.0 + ty
    counts = [0] * 64
    for y in range(32):
        py = y + 0.5 - cy
        for x in range(32):
            px = x + 0.5 - cx
            u = i00 * px + i01 * py + _GW / 2
            v = i10 * px + i11 * py + _GH / 2
            u += wob_a * math.sin(wob_f * v + wob_p)
            fi = int((u + _MARGIN) * _SUB + 0.5)
            fj = int((v + _MARGIN) * _SUB + 0.5)
            on = 0 <= fi < fw and 0 <= fj < fh and u > -_MARGIN and v > -_MARGIN and field[fj * fw + fi] <= thick
            if occ and (x + 0.5 - ox) ** 2 + (y + 0.5 - oy) ** 2 < orad * orad:
                on = False
            if clut and not on:
                t = min(1.0, max(0.0, ((x + 0.5 - ax) * (bx - ax) + (y + 0.5 - ay) * (by - ay)) / seg2))
                on = (x + 0.5 - ax - t * (bx - ax)) ** 2 + (y + 0.5 - ay - t * (by - ay)) ** 2 < cw * cw
            if rng.random() < speckle:
                on = not on
            if on:
                counts[(y // 4) * 8 + x // 4] += 1
    return counts


@functools.lru_cache(maxsize=8)
def glyph_images(n: int = GLYPH_COUNT, seed: int = 0) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Return ``(images, labels)``: ``n`` generated 8x8 digit images (each 64 ints in 0..16,
    row-major) and their labels, classes balanced (``i % 10``) and shuffled. Deterministic in
    ``(n, seed)``; pure Python, no third-party dependency."""
    if n < 1:
        raise ValueError("n must be positive")
    rng = random.Random(f"cascada-f1-glyphs-{seed}")
    labels = [i % 10 for i in range(n)]
    rng.shuffle(labels)
    images = tuple(tuple(_render(d, rng)) for d in labels)
    return images, tuple(labels)


def _split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Fixed train/test index split: a seeded shuffle, the last TEST_FRACTION is the test set."""
    idx = list(range(n))
    random.Random(f"cascada-f1-split-{seed}").shuffle(idx)
    n_test = int(round(TEST_FRACTION * n))
    return sorted(idx[: n - n_test]), sorted(idx[n - n_test:])


def _raw(source: str, seed: int) -> tuple[list[list[float]], list[int]]:
    if source == "glyphs":
        images, labels = glyph_images(GLYPH_COUNT, seed)
        return [[float(v) for v in im] for im in images], list(labels)
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits() if source == "sklearn" else sklearn.datasets.load_breast_cancer()
    data: list[list[float]] = [[float(v) for v in row] for row in bunch.data.tolist()]
    target: list[int] = [int(t) for t in bunch.target.tolist()]
    return data, target


def load_lists(source: str = "auto", seed: int = 0
               ) -> tuple[list[list[float]], list[int], list[list[float]], list[int]]:
    """Return ``(X_train, y_train, X_test, y_test)`` as plain Python lists (rows of floats and
    int labels). ``seed`` fixes the split (and, for glyphs, the images); the committed F1
    weights were trained with ``seed=0``. Raw feature scale: 0..16 for digits and glyphs,
    the original units for cancer (models normalise internally)."""
    src = resolve_source(source)
    X, y = _raw(src, seed if src == "glyphs" else 0)
    tr, te = _split(len(y), seed)
    return [X[i] for i in tr], [y[i] for i in tr], [X[i] for i in te], [y[i] for i in te]


def load(source: str = "auto", seed: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(X_train, y_train, X_test, y_test)``: ``float32`` features ``[N, F]`` and
    ``int64`` labels ``[N]`` as torch tensors, with the fixed split of :func:`load_lists`.
    F is 64 (8x8 images, row-major, 0..16) for ``sklearn``/``glyphs`` and 30 for ``cancer``."""
    import torch

    Xtr, ytr, Xte, yte = load_lists(source, seed)
    return (torch.tensor(Xtr, dtype=torch.float32), torch.tensor(ytr, dtype=torch.int64),
            torch.tensor(Xte, dtype=torch.float32), torch.tensor(yte, dtype=torch.int64))


def perturb(X: torch.Tensor, kind: Literal["noise", "shift"], strength: float = 1.0,
            seed: int = 0) -> torch.Tensor:
    """Return an out-of-distribution copy of 8x8 images ``X [N, 64]`` (0..16 scale).

    ``kind="noise"`` adds Gaussian noise of standard deviation ``4 * strength`` and clips to
    0..16; ``kind="shift"`` translates each image by a random whole number of pixels in
    ``[-round(2 * strength), round(2 * strength)]`` per axis, filling with zeros. Seeded by
    ``seed``; ``X`` is not modified."""
    import torch

    if X.dim() != 2 or X.shape[1] != 64:
        raise ValueError(f"perturb expects [N, 64] images, got {tuple(X.shape)}")
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return (X + torch.randn(X.shape, generator=g) * (4.0 * strength)).clamp(0.0, 16.0)
    if kind == "shift":
        r = int(round(2 * strength))
        imgs = X.reshape(-1, 8, 8)
        out = torch.zeros_like(imgs)
        shifts = torch.randint(-r, r + 1, (X.shape[0], 2), generator=g).tolist()
        for n, (dy, dx) in enumerate(shifts):
            ys, yd = (slice(0, 8 - dy), slice(dy, 8)) if dy >= 0 else (slice(-dy, 8), slice(0, 8 + dy))
            xs, xd = (slice(0, 8 - dx), slice(dx, 8)) if dx >= 0 else (slice(-dx, 8), slice(0, 8 + dx))
            out[n, yd, xd] = imgs[n, ys, xs]
        return out.reshape(-1, 64)
    raise ValueError(f"unknown perturbation {kind!r}; expected 'noise' or 'shift'")
