"""Per-tile feature extraction: the seed chain, a HOG-style descriptor and intensity stats.

Small pure functions on ``uint8`` grayscale arrays in the style of OpenCV's
``samples/python/digits.py``: no I/O, no Kafka, numpy-vectorised, OpenCV primitives only
(no ``cv2.HOGDescriptor``, which is absent from OpenCV 5).

Coordinates: ``x`` is the column, ``y`` the row, so ``I(x, y)`` is ``img[y, x]``.

Seed chain (see :class:`tilestream.config.FeatureConfig`)::

    I_pre  = sat(round(a*I + b))                       contrast()
    I_bin  = 255 where I_pre >= T else 0               binarize()
    I_edge = sum_{i,j} w(i,j) * I_bin(x+i, y+j)        edge()
    F      = sum_i w_i * I_edge(x-i, y)                feature_sum()

Feature vector (:func:`tile_features`, layout given by :func:`feature_names`)::

    [seed (4) | hog ((S/cell)^2 * bins) | intensity (4 + 8)]

which is 4 + 16*9 + 12 = 160 values for the default configuration (S=64, cell=16, bins=9).

Options of :class:`FeatureConfig`, all off by default (the vector above is unchanged):
``moment_norm`` (:func:`moment_normalize` before the HOG), ``hog_signed`` (orientation over
360 degrees), ``hog_grids`` (:func:`hog_grid`: overlapping, bilinearly weighted cells on one
or several grids) and ``stats=False`` (the HOG part alone).  ``classifier.train.DIGITS_FEATURES``
uses all four for 20x20 digits: 832 values.

:func:`tile_features` is the definition (training on single images, the seed Pool peer in
benchmarks/peers.py).  :func:`tiles_features` computes many tiles at once and gives the same
vectors bit for bit; the processor uses it for a frame (``pipeline.image_tile_features``):
on vtest 9-10 instead of 16-18 ms/frame in one thread.  How it stays exact and why it is
built as it is: the notes above :func:`tiles_features`.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import cv2
import numpy as np

from tilestream.config import FeatureConfig

SEED_NAMES = ("seed_mean_F", "seed_mean_abs_F", "seed_edge_frac", "seed_white_frac")
INTENSITY_BINS = 8
INTENSITY_NAMES = ("int_mean", "int_std", "int_min", "int_max") + tuple(
    f"int_hist_{k}" for k in range(INTENSITY_BINS)
)
# |I_edge| above this counts as an edge pixel; absorbs float32 rounding of non-integer kernels
# (I_edge is in units of 255, so this is far below any real response).
EDGE_EPS = 1e-3
_HELLINGER_EPS = 1e-7


def _check_gray(img: np.ndarray, name: str = "img") -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.uint8:
        got = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{name} must be a 2-D uint8 grayscale array, got {got}")
    if img.size == 0:
        raise ValueError(f"{name} is empty")


# --------------------------------------------------------------------------- seed chain


@lru_cache(maxsize=64)
def _contrast_lut(a: float, b: float) -> np.ndarray:
    v = np.rint(a * np.arange(256, dtype=np.float64) + b)
    return np.clip(v, 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def _binarize_lut(T: float) -> np.ndarray:
    return np.where(np.arange(256) >= T, 255, 0).astype(np.uint8)


def contrast(img: np.ndarray, a: float, b: float) -> np.ndarray:
    """``I_pre = sat(round(a*I + b))`` as ``uint8``.

    ``a*I + b`` is evaluated in float64 for each of the 256 input levels, rounded half to
    even (``np.rint``: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2) and saturated to ``0..255``; the
    resulting lookup table is applied with ``cv2.LUT``.  Negative results saturate to 0,
    unlike ``cv2.convertScaleAbs`` which would take their absolute value.
    """
    _check_gray(img)
    return cv2.LUT(img, _contrast_lut(float(a), float(b)))


def binarize(img: np.ndarray, T: float) -> np.ndarray:
    """``I_bin = 255 where I >= T else 0`` (``uint8``).

    Note ``>=``: a pixel exactly at ``T`` is white, whereas ``cv2.THRESH_BINARY`` uses ``>``.
    ``T <= 0`` gives an all-white image, ``T > 255`` an all-black one.
    """
    _check_gray(img)
    return cv2.LUT(img, _binarize_lut(float(T)))


def _kernel_array(kernel) -> np.ndarray:
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 2 or k.size == 0:
        raise ValueError(f"kernel must be a non-empty 2-D (rows x cols) array, got shape {k.shape}")
    return k


def edge(img_bin: np.ndarray, kernel) -> np.ndarray:
    """``I_edge(x, y) = sum_{i,j} w(i, j) * I_bin(x+i, y+j)`` as ``float32``.

    A correlation (not a convolution: the kernel is not flipped, so a single white pixel
    answers with the kernel rotated by 180 degrees).  ``kernel`` is given as rows, like an
    image: ``w(i, j) = kernel[j + cy][i + cx]`` with ``i`` along x (columns), ``j`` along y
    (rows) and the anchor at the centre ``(cx, cy) = (n_cols // 2, n_rows // 2)``.
    Out-of-image samples replicate the nearest border pixel (``BORDER_REPLICATE``), so a
    tile border is not itself an edge.  Values are in units of ``I_bin`` (0/255).
    Computed with ``cv2.filter2D(img_bin, CV_32F, kernel, borderType=BORDER_REPLICATE)``.
    """
    _check_gray(img_bin, "img_bin")
    return cv2.filter2D(img_bin, cv2.CV_32F, _kernel_array(kernel), borderType=cv2.BORDER_REPLICATE)


def feature_sum(I_edge: np.ndarray, w_i) -> np.ndarray:
    """``F(x, y) = sum_{i=0}^{n-1} w_i * I_edge(x-i, y)`` as ``float32``.

    A causal 1-D convolution along x (within each row); samples left of the image
    (``x - i < 0``) are zero.  ``w_i = (1,)`` is the identity.
    """
    E = np.asarray(I_edge, dtype=np.float32)
    w = np.asarray(w_i, dtype=np.float32).ravel()
    if E.ndim != 2:
        raise ValueError(f"I_edge must be 2-D, got shape {E.shape}")
    if w.size == 0:
        raise ValueError("w_i must hold at least one weight")
    F = np.zeros_like(E)
    width = E.shape[1]
    for i, wi in enumerate(w[:width]):  # one vectorised step per tap
        if wi:
            F[:, i:] += wi * E[:, : width - i]
    return F


def _seed_maps(tile: np.ndarray, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(I_bin, I_edge, F)`` for ``tile``; contrast and binarize fused into one LUT."""
    lut = _binarize_lut(float(cfg.T))[_contrast_lut(float(cfg.a), float(cfg.b))]
    I_bin = cv2.LUT(tile, lut)
    I_edge = edge(I_bin, cfg.kernel)
    return I_bin, I_edge, feature_sum(I_edge, cfg.w_i)


def seed_features(tile: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The seed chain summarised as 4 ``float32`` values (names: ``SEED_NAMES``).

    With ``N`` the number of pixels and ``F``, ``I_edge`` taken from ``I_bin`` in {0, 255}
    but reported divided by 255 (i.e. as if ``I_bin`` were in {0, 1})::

        [ sum F / (255 N),              seed_mean_F
          sum |F| / (255 N),            seed_mean_abs_F
          #{|I_edge| > 1e-3} / N,       seed_edge_frac
          #{I_bin = 255} / N ]          seed_white_frac
    """
    _check_gray(tile, "tile")
    I_bin, I_edge, F = _seed_maps(tile, cfg)
    n = float(tile.size)
    return np.array(
        [
            cv2.sumElems(F)[0] / (255.0 * n),
            cv2.norm(F, cv2.NORM_L1) / (255.0 * n),
            np.count_nonzero(np.abs(I_edge) > EDGE_EPS) / n,
            np.count_nonzero(I_bin) / n,
        ],
        dtype=np.float32,
    )


# --------------------------------------------------------------------------- deskew, HOG


def deskew(img: np.ndarray, size) -> np.ndarray:
    """Moment-based deskew, exactly as OpenCV's digits sample.

    ``skew = mu11 / mu02`` from ``cv2.moments(img)``; the image is sheared horizontally by
    ``warpAffine`` with ``M = [[1, skew, -0.5*size*skew], [0, 1, 0]]`` and
    ``WARP_INVERSE_MAP | INTER_LINEAR``, i.e. ``out(x, y) = img(x + skew*(y - size/2), y)``
    (zero outside the source).  If ``|mu02| < 1e-2`` the image is returned unchanged (copy).
    ``size`` is the side of the square output; ``(width, height)`` is also accepted for a
    non-square tile (the shear is then centred on ``height/2``).
    """
    _check_gray(img)
    w, h = (size, size) if np.isscalar(size) else size
    m = cv2.moments(img)
    if abs(m["mu02"]) < 1e-2:
        return img.copy()
    skew = m["mu11"] / m["mu02"]
    M = np.float32([[1, skew, -0.5 * h * skew], [0, 1, 0]])
    return cv2.warpAffine(img, M, (int(w), int(h)), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR)


@lru_cache(maxsize=32)
def _cell_index(h: int, w: int, cell: int, n_cols: int) -> np.ndarray:
    ys, xs = np.divmod(np.arange(h * w), w)
    return ((ys // cell) * n_cols + xs // cell).astype(np.intp)


@lru_cache(maxsize=32)
def _wrap_lut(bins: int) -> np.ndarray:
    return (np.arange(2 * bins + 2) % bins).astype(np.intp)


def _orientation_votes(img: np.ndarray, bins: int, signed: bool) -> tuple[np.ndarray, ...]:
    """Per pixel (raveled): the two orientation bins a gradient votes for and the two votes.

    Central-difference gradients (``Sobel ksize=1``), angle by ``cartToPolar``;
    ``t = theta * bins / span`` with ``span`` 180 (unsigned) or 360 (signed) degrees, and a
    pixel gives ``|g| (1 - frac t)`` to bin ``floor t`` and ``|g| frac t`` to the next one
    (mod ``bins``).
    """
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=1)
    return _polar_votes(gx, gy, bins, signed)


def _polar_votes(gx: np.ndarray, gy: np.ndarray, bins: int, signed: bool) -> tuple[np.ndarray, ...]:
    """:func:`_orientation_votes` from the gradients (also builds :func:`_vote_lut`)."""
    mag, ang = cv2.cartToPolar(gx, gy, angleInDegrees=True)
    t = ang.ravel() * np.float32(bins)  # in [0, 2*bins]: angle is in [0, 360]
    # (not * bins/180, which is inexact: 90 * (6/180) != 3 in float32)
    t /= np.float32(360.0 if signed else 180.0)
    k = t.astype(np.intp)  # floor, as t >= 0
    frac = t - k
    wrap = _wrap_lut(bins)  # k mod bins (unsigned: theta and theta + 180 share a bin)
    m = mag.ravel()
    return wrap[k], wrap[k + 1], m * (1.0 - frac), m * frac


def _hellinger(hist: np.ndarray) -> np.ndarray:
    """Hellinger kernel, as digits.py: L1-normalise, sqrt, L2-normalise (float32 out)."""
    hist = hist.astype(np.float64, copy=False)
    hist /= hist.sum() + _HELLINGER_EPS
    np.sqrt(hist, out=hist)
    hist /= np.linalg.norm(hist) + _HELLINGER_EPS
    return hist.astype(np.float32)


def _hog(tile: np.ndarray, cell: int, bins: int, grid: tuple[int, int], signed: bool = False) -> np.ndarray:
    """HOG of ``tile`` on a ``grid = (n_rows, n_cols)`` of cells anchored at the top-left.

    Cells (partly) outside the tile just get less (or no) mass; used for shrunk edge tiles.
    """
    b0, b1, v0, v1 = _orientation_votes(tile, bins, signed)
    base = _cell_index(tile.shape[0], tile.shape[1], cell, grid[1]) * bins
    n = grid[0] * grid[1] * bins
    return _hellinger(np.bincount(base + b0, v0, n) + np.bincount(base + b1, v1, n))


@lru_cache(maxsize=64)
def _tents(side: int, grid: int, length: int) -> np.ndarray:
    """``(grid, length)`` bilinear weights: pixel ``x`` of a ``side``-long axis, ``grid`` cells.

    Cell ``i`` has its centre at ``c_i = (i + 1/2) * side/grid - 1/2`` and weight
    ``max(0, 1 - |x - c_i| / (side/grid))``: a pixel between two centres splits its vote
    linearly between them (Dalal-Triggs spatial interpolation), so cells overlap by half.
    Only the first ``length`` pixels are kept (shrunk edge tiles).
    """
    cell = side / grid
    centres = (np.arange(grid) + 0.5) * cell - 0.5
    x = np.arange(length)
    w = np.clip(1.0 - np.abs(x[None, :] - centres[:, None]) / cell, 0.0, None).astype(np.float32)
    w.setflags(write=False)  # cached and shared
    return w


def _vote_planes(img: np.ndarray, bins: int, signed: bool) -> np.ndarray:
    """``(h, w * bins)`` float32: each pixel's two orientation votes in its own bins."""
    h, w = img.shape
    b0, b1, v0, v1 = _orientation_votes(img, bins, signed)
    base = np.arange(h * w) * bins
    n = h * w * bins
    planes = np.bincount(base + b0, v0, n) + np.bincount(base + b1, v1, n)
    return planes.astype(np.float32).reshape(h, w * bins)


def _pool_tent(planes: np.ndarray, h: int, w: int, bins: int, grid: int, side: int) -> np.ndarray:
    """Un-normalised ``(grid, grid, bins)`` histograms: bilinear cell votes of ``planes``."""
    # sum_y sum_x Ty[r, y] Tx[c, x] votes[y, x, b], as two matrix products
    per_row = (_tents(side, grid, h) @ planes).reshape(grid, w, bins).transpose(0, 2, 1)  # (r, b, x)
    return (per_row @ _tents(side, grid, w).T).transpose(0, 2, 1)  # (r, c, b)


def hog_grid(img: np.ndarray, grids, bins: int, signed: bool = False, side: int | None = None) -> np.ndarray:
    """HOG with overlapping cells on one or several grids (a spatial pyramid).

    For each ``n`` in ``grids``: ``n x n`` cells spread evenly over a ``side x side`` square
    anchored at the top-left (``side`` defaults to the image's larger side), each pixel's
    orientation votes (as :func:`hog`, but over 360 degrees when ``signed``) split
    bilinearly between the neighbouring cell centres (see :func:`_tents`).  Each grid's
    ``n*n*bins`` histogram is Hellinger-normalised on its own; the grids are concatenated in
    the given order, each laid out ``[cell_row, cell_col, bin]``.
    """
    _check_gray(img)
    grids = tuple(int(n) for n in grids)
    if not grids or min(grids) < 1 or int(bins) < 1:
        raise ValueError(f"grids must be non-empty and >= 1 and bins >= 1, got grids={grids}, bins={bins}")
    side = int(side) if side is not None else max(img.shape)
    if max(img.shape) > side:
        raise ValueError(f"image {img.shape[0]}x{img.shape[1]} is larger than side {side}")
    h, w = img.shape
    planes = _vote_planes(img, int(bins), bool(signed))
    return np.concatenate([_hellinger(_pool_tent(planes, h, w, int(bins), n, side).ravel()) for n in grids])


def moment_normalize(img: np.ndarray, size: int, box: float = 0.0) -> np.ndarray:
    """Moment normalisation of a bright-on-dark glyph onto a ``size x size`` canvas.

    From ``cv2.moments(img)`` (intensity-weighted): centroid ``(xc, yc)``, slant
    ``s = mu11 / mu02`` (0 when ``mu02 < 1e-2``), and the standard deviations of the
    deslanted glyph ``sx = sqrt((mu20 - s mu11) / m00)``, ``sy = sqrt(mu02 / m00)``
    (each at least 0.5 px).  The 4-sigma box ``W1 = 4 sx, H1 = 4 sy`` is mapped to a box
    whose longer side is ``box`` (default: ``size``) and whose aspect ratio is
    ``r2 = sqrt(sin(pi/2 * r1))`` of the original ``r1 = min/max`` (Liu et al.'s aspect-ratio
    mapping: thin glyphs are widened, but stay thinner than round ones).  One affine warp
    (``INTER_LINEAR``, zero outside) does it all: it deslants about the centroid, as
    :func:`deskew` does about the tile centre, scales, and puts the centroid at the canvas
    centre ``((size - 1)/2, (size - 1)/2)``.  A blank image gives a blank canvas.
    """
    _check_gray(img)
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    m = cv2.moments(img)
    if m["m00"] <= 0:
        return np.zeros((size, size), np.uint8)
    xc, yc = m["m10"] / m["m00"], m["m01"] / m["m00"]
    slant = m["mu11"] / m["mu02"] if m["mu02"] >= 1e-2 else 0.0
    sx = np.sqrt(max((m["mu20"] - slant * m["mu11"]) / m["m00"], 0.25))
    sy = np.sqrt(max(m["mu02"] / m["m00"], 0.25))
    w1, h1 = 4.0 * sx, 4.0 * sy
    long_side = float(box) if box and box > 0 else float(size)
    r2 = np.sqrt(np.sin(np.pi / 2 * min(w1, h1) / max(w1, h1)))
    w2, h2 = (long_side, long_side * r2) if w1 >= h1 else (long_side * r2, long_side)
    ax, ay = w2 / w1, h2 / h1
    c = (size - 1) / 2.0
    M = np.array([[ax, -ax * slant, c - ax * (xc - slant * yc)], [0.0, ay, c - ay * yc]], np.float64)
    return cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def hog(tile: np.ndarray, cell: int, bins: int) -> np.ndarray:
    """HOG-style descriptor: per-cell magnitude-weighted orientation histograms.

    * Gradients ``gx, gy`` by ``cv2.Sobel(ksize=1)`` (central difference ``[-1, 0, 1]``,
      no smoothing; border ``BORDER_REFLECT_101``, so the gradient across the tile border
      is 0), magnitude and angle in degrees by ``cv2.cartToPolar`` (OpenCV's fast atan,
      accurate to ~0.01 degree).
    * Unsigned orientation ``theta in [0, 180)``; bin ``k`` is centred on ``k * 180/bins``
      (bin 0 = horizontal gradient, i.e. a vertical edge).  With ``t = theta * bins / 180``
      a pixel adds ``|g| * (1 - frac(t))`` to bin ``floor(t)`` and ``|g| * frac(t)`` to bin
      ``floor(t) + 1`` (circularly, mod ``bins``).
    * Cells of ``cell x cell`` pixels, row-major; the tile's sides must be multiples of
      ``cell`` (``ValueError`` otherwise).  Output layout: ``[cell_row, cell_col, bin]``.
    * Normalisation over the whole descriptor with the Hellinger kernel as digits.py:
      ``h /= sum(h) + 1e-7; h = sqrt(h); h /= ||h||_2 + 1e-7`` (a flat tile gives zeros).

    Returns ``(h/cell) * (w/cell) * bins`` ``float32`` values.
    """
    _check_gray(tile, "tile")
    if int(cell) < 1 or int(bins) < 1:
        raise ValueError(f"cell and bins must be >= 1, got cell={cell}, bins={bins}")
    h, w = tile.shape
    if h % cell or w % cell:
        raise ValueError(f"tile size {h}x{w} is not a multiple of the HOG cell size {cell}")
    return _hog(tile, int(cell), int(bins), (h // cell, w // cell))


# --------------------------------------------------------------------------- intensity


def intensity_stats(tile: np.ndarray) -> np.ndarray:
    """``[mean, std, min, max] / 255`` followed by an 8-bin normalised histogram (``float32``).

    ``std`` is the population standard deviation; histogram bin ``k`` holds the fraction of
    pixels with ``32k <= I < 32(k+1)``, so the 8 values sum to 1.
    """
    _check_gray(tile, "tile")
    mean, std = cv2.meanStdDev(tile)
    lo, hi, _, _ = cv2.minMaxLoc(tile)
    hist = np.bincount((tile >> 5).ravel(), minlength=INTENSITY_BINS) / float(tile.size)
    out = np.empty(4 + INTENSITY_BINS, dtype=np.float32)
    out[:4] = (mean[0, 0] / 255.0, std[0, 0] / 255.0, lo / 255.0, hi / 255.0)
    out[4:] = hist
    return out


# --------------------------------------------------------------------------- tile vector


def _hog_grid(cfg: FeatureConfig) -> int:
    """Cells per side of the classic HOG (``tile_size / hog_cell``); checks the HOG settings."""
    if cfg.hog_bins < 1:
        raise ValueError(f"hog_bins must be >= 1, got {cfg.hog_bins}")
    if cfg.moment_norm and cfg.norm_size < 0:
        raise ValueError(f"norm_size must be >= 0, got {cfg.norm_size}")
    if cfg.hog_grids:
        if min(int(n) for n in cfg.hog_grids) < 1:
            raise ValueError(f"hog_grids must all be >= 1, got {tuple(cfg.hog_grids)}")
        return 0
    if cfg.hog_cell < 1:
        raise ValueError(f"hog_cell and hog_bins must be >= 1, got {cfg.hog_cell}, {cfg.hog_bins}")
    side = _hog_side(cfg)
    if side % cfg.hog_cell:
        what = f"norm_size {side}" if cfg.moment_norm else f"tile_size {side}"
        raise ValueError(f"{what} is not a multiple of hog_cell {cfg.hog_cell}")
    return side // cfg.hog_cell


def _hog_side(cfg: FeatureConfig) -> int:
    """Side of the square the HOG covers: the normalised canvas, or the tile."""
    return (cfg.norm_size or cfg.tile_size) if cfg.moment_norm else cfg.tile_size


def _hog_layout(cfg: FeatureConfig) -> list[tuple[str, int]]:
    """``[(name prefix, cells per side)]`` of the HOG blocks, in vector order."""
    n = _hog_grid(cfg)
    if cfg.hog_grids:
        return [(f"hog_g{int(g)}_", int(g)) for g in cfg.hog_grids]
    return [("hog_", n)]


def feature_length(cfg: FeatureConfig) -> int:
    """``4 + (tile_size / hog_cell)^2 * hog_bins + 12`` (160 for the defaults).

    With ``hog_grids`` the HOG part is ``sum(n^2) * hog_bins``; without ``stats`` the seed
    (4) and intensity (12) values are left out.
    """
    n_hog = sum(n * n for _, n in _hog_layout(cfg)) * cfg.hog_bins
    return n_hog + (len(SEED_NAMES) + len(INTENSITY_NAMES) if cfg.stats else 0)


def feature_names(cfg: FeatureConfig) -> list[str]:
    """Names of the :func:`tile_features` values, in order.

    HOG values are ``hog_r{row}_c{col}_b{bin}`` (``hog_g{n}_r{row}_c{col}_b{bin}`` for
    each grid ``n`` of ``hog_grids``).
    """
    hog_names = [
        f"{prefix}r{r}_c{c}_b{k}" for prefix, n in _hog_layout(cfg) for r in range(n) for c in range(n) for k in range(cfg.hog_bins)
    ]
    if not cfg.stats:
        return hog_names
    return [*SEED_NAMES, *hog_names, *INTENSITY_NAMES]


def hog_input(tile: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The image the HOG is computed on: moment-normalised, deskewed or the tile itself."""
    h, w = tile.shape
    if cfg.moment_norm:
        return moment_normalize(tile, cfg.norm_size or cfg.tile_size, cfg.norm_box)
    if cfg.deskew:
        return deskew(tile, (w, h))
    return tile


def tile_features(tile: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``concat(seed_features, hog, intensity_stats)``: ``feature_length(cfg)`` ``float32`` values.

    The tile is normally ``tile_size x tile_size`` (``"pad"`` and ``"drop"`` policies).  A
    smaller ``"shrink"`` edge tile gives a vector of the same length: its HOG uses the same
    ``tile_size / hog_cell`` cell grid anchored at the top-left, cells beyond the tile
    staying empty; seed and intensity values are per-pixel averages anyway.
    If ``cfg.deskew`` the tile is deskewed (:func:`deskew`) before the HOG only, as in
    digits.py; the seed chain and intensity statistics see the raw pixels.

    Options (all off by default, which gives the vector above):

    * ``moment_norm``: the HOG sees :func:`moment_normalize` of the tile on a
      ``norm_size`` canvas (default ``tile_size``) instead (``deskew`` is then implied).
    * ``hog_signed``: orientations over 360 degrees (dark-to-bright differs from
      bright-to-dark), bins of ``360 / hog_bins`` degrees.
    * ``hog_grids``: :func:`hog_grid` (overlapping cells, one normalised histogram per grid)
      instead of the ``hog_cell`` cells.
    * ``stats=False``: the vector is the HOG alone (no seed chain, no intensity values).
    """
    _check_gray(tile, "tile")
    n = _hog_grid(cfg)
    h, w = tile.shape
    if h > cfg.tile_size or w > cfg.tile_size:
        raise ValueError(f"tile {h}x{w} is larger than tile_size {cfg.tile_size}")
    hog_in = hog_input(tile, cfg)
    if cfg.hog_grids:
        hog_vec = hog_grid(hog_in, cfg.hog_grids, cfg.hog_bins, cfg.hog_signed, _hog_side(cfg))
    else:
        hog_vec = _hog(hog_in, cfg.hog_cell, cfg.hog_bins, (n, n), cfg.hog_signed)
    if not cfg.stats:
        return hog_vec
    out = np.empty(feature_length(cfg), dtype=np.float32)
    k = len(SEED_NAMES)
    out[:k] = seed_features(tile, cfg)
    out[k:k + hog_vec.size] = hog_vec
    out[k + hog_vec.size:] = intensity_stats(tile)
    return out


# --------------------------------------------------------------------------- many tiles at once
#
# tiles_features() is tile_features() for a whole frame's tiles in a few vectorised calls.
# Why: on vtest (108 tiles of 64 px) features were 17.7 of the 22.1 ms a frame costs in one
# thread (compute limit, 2026-12-02 10:32).  Batching alone (the same numpy calls on a stack)
# bought little (17 -> ~13 ms/frame): the per-tile path is dominated by per-pixel float64
# work, not call overhead.  What pays is doing less per pixel, exactly:
# * HOG votes by table: with uint8 pixels the Sobel(ksize=1) gradients are integers in
#   [-255, 255], so (bin, next bin, both votes) of every pixel is looked up in a table built
#   once per (bins, signed) by the per-tile code itself (_polar_votes: cartToPolar is
#   elementwise) -- no Sobel, cartToPolar or float64 temporaries per frame;
# * the seed chain on 0/1 in int16 (filter2D to CV_16S) when the kernel and w_i are integers:
#   I_edge and F are then exact integers (255x these), and so are their sums in any order;
# * intensity statistics and the white fraction from one grey-level histogram per tile
#   (meanStdDev on uint8 sums exactly, then mean = s/N, std = sqrt(max(sq/N - mean^2, 0))).
# Measured (vtest, 30 frames, CPU time, min of 6): per tile 15.9 ms/frame, batched 9.1-9.4;
# python -m benchmarks.compute_limit --frames 100 --sheets 3, A/B alternated 3 times on
# 2026-12-02 12:01 (shared machine, load 5): whole-frame CPU per vtest frame 23.8/22.9/23.8 ms
# per tile, 17.4/16.2/17.4 batched; per digit sheet (20 px, hog_cell 10) 802/798/762 -> 370/450/331.
# The batched rows are held to be *the same bits* as tile_features (tests/test_features_batched.py
# compares the float32 bit patterns); every float step keeps the per-tile operations and order:
# * HOG: one bincount over the stack (each bin accumulates its pixels in the same order);
#   bilinear pooling: np.matmul over the stack (one BLAS call per tile, the same shapes);
#   Hellinger: numpy's row-wise sum (pairwise, as the 1-D sum) and one np.dot per row (the
#   BLAS dot np.linalg.norm uses);
# * filter2D runs on a tall image of the stacked tiles (same width, so the same column
#   borders and SIMD layout per row), each tile padded above/below by the rows
#   BORDER_REPLICATE would make; non-integer kernels keep the float path and sum with
#   cv2.sumElems / cv2.norm per tile.
# What cannot be stacked stays per tile inside the batch: moment_normalize / deskew (a warp
# per tile: the digits config gains less, 480 -> ~290 ms per 5,000-tile sheet), and the edge
# filter for kernels of >= 50 taps (filter2D switches to a DFT whose rounding depends on the
# image size).  Tiles (or moment-normalised canvases) of fewer than _MIN_BATCH_PIXELS pixels
# go through tile_features: below two SIMD vectors cartToPolar's atan may take a scalar path
# (not seen to differ on this build; kept as a margin, such tiles are rare and cheap).

_MIN_BATCH_PIXELS = 64
# Pixels per chunk of the stack (x bins for hog_grids' vote planes), chunks of even size:
# a vtest frame in 2 chunks of 54 tiles.  Measured (CPU ms/frame, median of 6): 7 chunks 10.1,
# 4: 10.7, 2: 10.4, but 1 chunk of 108: 16-19 (temporaries of several MB are fresh pages on
# every call); digits sheet (DIGITS_FEATURES): 176 chunks 260-300 ms, 22: 400-470.
_CHUNK_PIXELS = 1 << 18
_DFT_TAPS = 50  # filter2D uses a DFT from this many kernel taps on


_WORK = threading.local()


def _buf(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A scratch array of this thread, reused chunk after chunk (contents undefined).

    Why: temporaries of a chunk (~1-2 MB each) are mmapped fresh by malloc and released on
    every call otherwise; in the compute-limit run that was 500,000 extra page faults and
    1 s of system time per 100 frames, which ate the whole gain.  Bounded: at most
    ``_CHUNK_PIXELS`` elements per name are kept (a larger request gets a plain array), about
    12 MB per thread that computed features.
    """
    size = int(np.prod(shape))
    if size > _CHUNK_PIXELS:
        return np.empty(shape, dtype)
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None:
        bufs = _WORK.bufs = {}
    key = (name, np.dtype(dtype).str)
    a = bufs.get(key)
    if a is None or a.size < size:
        a = bufs[key] = np.empty(max(size, a.size if a is not None else 0), dtype)
    return a[:size].reshape(shape)


def _check_stack(stack: np.ndarray) -> None:
    if not isinstance(stack, np.ndarray) or stack.ndim != 3 or stack.dtype != np.uint8:
        got = f"{stack.dtype} array of shape {stack.shape}" if isinstance(stack, np.ndarray) else type(stack).__name__
        raise ValueError(f"tiles must be a 3-D (n, h, w) uint8 array, got {got}")
    if stack.shape[1] == 0 or stack.shape[2] == 0:
        raise ValueError("tiles are empty")


def _integer_chain(kernel: np.ndarray, w_i: np.ndarray, tile_size: int) -> bool:
    """Whether the seed chain can run on 0/1 integers: ``I_edge = 255 E``, ``F = 255 F'``.

    True for an integer kernel and integer ``w_i`` whose bounds keep every value exact:
    ``|E| <= sum|k| < 2^15`` (``filter2D`` to ``CV_16S``), ``|I_edge|, |F| <= 255 sum|k| sum|w|
    < 2^24`` (so the per-tile float32 maps hold exact integers) and a tile's sum of ``|F|``
    below ``2^53`` (so cv2.sumElems / cv2.norm, which add in double, give the exact integer).
    """
    if not (np.all(kernel == np.round(kernel)) and np.all(w_i == np.round(w_i))):
        return False
    k1, w1 = float(np.abs(kernel).sum()), float(np.abs(w_i).sum())
    return k1 < 2 ** 15 and 255.0 * k1 * w1 < 2.0 ** 24 and 255.0 * k1 * w1 * tile_size ** 2 < 2.0 ** 53


def _stack_edge(I_bin: np.ndarray, kernel: np.ndarray, depth: int = cv2.CV_32F) -> np.ndarray:
    """:func:`edge` of each tile of a ``(n, h, w)`` stack, as one ``filter2D`` (``depth`` out)."""
    n, h, w = I_bin.shape
    kh = kernel.shape[0]
    if kernel.size >= _DFT_TAPS:
        return np.stack([cv2.filter2D(t, depth, kernel, borderType=cv2.BORDER_REPLICATE) for t in I_bin])
    top = kh // 2
    padded = _buf("padded", (n, h + kh - 1, w), np.uint8)  # rows replicated as BORDER_REPLICATE would
    padded[:, top:top + h] = I_bin
    padded[:, :top] = I_bin[:, :1]
    padded[:, top + h:] = I_bin[:, -1:]
    dst = _buf(f"edge{depth}", (n * (h + kh - 1), w), np.int16 if depth == cv2.CV_16S else np.float32)
    E = cv2.filter2D(padded.reshape(-1, w), depth, kernel, dst=dst, borderType=cv2.BORDER_REPLICATE)
    return E.reshape(n, h + kh - 1, w)[:, top:top + h]  # a view: no copy


@lru_cache(maxsize=16)
def _seed_plan_cached(a: float, b: float, T: float, kernel, w_i, tile_size: int) -> tuple:
    lut = _binarize_lut(T)[_contrast_lut(a, b)]
    k = _kernel_array(kernel)
    wts = np.asarray(w_i, dtype=np.float32).ravel()
    if wts.size == 0:
        raise ValueError("w_i must hold at least one weight")
    integer = k.size < _DFT_TAPS and _integer_chain(k, wts, tile_size)  # (a DFT rounds)
    return lut, k, wts, integer


def _seed_plan(cfg: FeatureConfig) -> tuple:
    """``(LUT, kernel, w_i, integer path?)`` of the seed chain, once per settings."""
    key = (float(cfg.a), float(cfg.b), float(cfg.T), cfg.kernel, cfg.w_i, cfg.tile_size)
    try:
        return _seed_plan_cached(*key)
    except TypeError:  # unhashable (lists): not cached
        return _seed_plan_cached.__wrapped__(*key)


def _stack_seed(stack: np.ndarray, plan: tuple, levels: np.ndarray) -> np.ndarray:
    """:func:`seed_features` of each tile: ``(n, 4)`` float32."""
    n, h, w = stack.shape
    lut, kernel, wts, integer = plan
    npx = float(h * w)
    out = np.empty((n, len(SEED_NAMES)), dtype=np.float64)
    if integer:
        # On 0/1 in int16/int32: the exact integers the float path holds, / 255 (half the bytes
        # and filter2D to CV_16S: 0.55 vs 1.05 ms/frame on vtest).  The sign of a zero, the only
        # thing integers cannot carry, changes none of the four sums and counts.
        I01 = cv2.LUT(stack.reshape(-1, w), (lut != 0).astype(np.uint8), dst=_buf("I01", (n * h, w), np.uint8))
        E = _stack_edge(I01.reshape(n, h, w), kernel, cv2.CV_16S)
        if wts.size == 1 and wts[0] == 1:
            Fi = E
        else:
            Fi = np.zeros((n, h, w), np.int32)
            for i, wi in enumerate(wts[:w].astype(np.int32)):  # as feature_sum, along x
                if wi:
                    Fi[:, :, i:] += wi * E[:, :, : w - i].astype(np.int32)
        out[:, 0] = (Fi.sum(axis=(1, 2), dtype=np.int64) * 255).astype(np.float64)
        out[:, 1] = (np.abs(Fi, out=_buf("absF", Fi.shape, Fi.dtype)).sum(axis=(1, 2), dtype=np.int64)
                     * 255).astype(np.float64)
        out[:, 2] = np.not_equal(E, 0, out=_buf("edges", E.shape, bool)).sum(axis=(1, 2))
    else:
        I_bin = cv2.LUT(stack.reshape(-1, w), lut).reshape(n, h, w)
        E = _stack_edge(I_bin, kernel)
        F = np.zeros((n, h, w), np.float32)
        for i, wi in enumerate(wts[:w]):  # as feature_sum, along x
            if wi:
                F[:, :, i:] += wi * E[:, :, : w - i]
        out[:, 0] = [cv2.sumElems(f)[0] for f in F]  # in double, in OpenCV's order, as per tile
        out[:, 1] = [cv2.norm(f, cv2.NORM_L1) for f in F]
        out[:, 2] = np.count_nonzero(np.abs(E) > EDGE_EPS, axis=(1, 2))
    out[:, 0] /= 255.0 * npx
    out[:, 1] /= 255.0 * npx
    out[:, 2] /= npx
    out[:, 3] = levels[:, lut != 0].sum(axis=1) / npx  # pixels whose level maps to white
    return out.astype(np.float32)


def _stack_levels(stack: np.ndarray) -> np.ndarray:
    """``(n, 256)`` int64: how many pixels of each tile have each grey level."""
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    idx = np.add(flat, (np.arange(n, dtype=np.intp) * 256)[:, None], out=_buf("levels", flat.shape, np.intp))
    return np.bincount(idx.ravel(), minlength=n * 256).reshape(n, 256)


def _stack_intensity(levels: np.ndarray, npx: int) -> np.ndarray:
    """:func:`intensity_stats` of each tile from its grey-level counts: ``(n, 12)`` float32.

    ``cv2.meanStdDev`` on ``uint8`` sums pixels and squares exactly, then takes
    ``mean = s * (1/N)``, ``std = sqrt(max(sq * (1/N) - mean^2, 0))`` in double, as here.
    """
    n = levels.shape[0]
    g = np.arange(256, dtype=np.int64)
    scale = 1.0 / npx
    mean = (levels @ g).astype(np.float64) * scale
    std = np.sqrt(np.maximum((levels @ (g * g)).astype(np.float64) * scale - mean * mean, 0.0))
    present = levels > 0
    out = np.empty((n, 4 + INTENSITY_BINS), dtype=np.float32)
    out[:, 0] = mean / 255.0
    out[:, 1] = std / 255.0
    out[:, 2] = present.argmax(axis=1) / 255.0
    out[:, 3] = (255 - present[:, ::-1].argmax(axis=1)) / 255.0
    out[:, 4:] = levels.reshape(n, INTENSITY_BINS, 256 // INTENSITY_BINS).sum(axis=2) / float(npx)
    return out


_G = 255  # |gx|, |gy| <= 255 for uint8 central differences
_GSPAN = 2 * _G + 1


@lru_cache(maxsize=8)
def _vote_lut(bins: int, signed: bool) -> tuple[np.ndarray, ...]:
    """:func:`_orientation_votes` for every integer gradient ``(gx, gy)`` in ``[-255, 255]^2``.

    Index ``(gx + 255) * 511 + (gy + 255)``; ``(b0, next bin, v0, v1)``: ``b0, v0, v1`` as the
    per-tile path gives them (the same :func:`_polar_votes`: cartToPolar is elementwise) and
    ``b1 = next[b0]``; ``b0`` in the smallest integer type (the gathers cost per byte): 4.4 MB
    per setting.
    """
    g = np.arange(-_G, _G + 1, dtype=np.float32)
    gx = np.ascontiguousarray(np.broadcast_to(g[:, None], (_GSPAN, _GSPAN)))
    gy = np.ascontiguousarray(np.broadcast_to(g[None, :], (_GSPAN, _GSPAN)))
    b0, b1, v0, v1 = _polar_votes(gx, gy, bins, signed)
    nxt = (np.arange(bins) + 1) % bins  # b1 = (b0 + 1) mod bins
    if not np.array_equal(nxt[b0], b1):
        raise RuntimeError("orientation votes: the second bin is not the next one")
    out = (b0.astype(np.min_scalar_type(bins)), nxt.astype(np.intp), v0, v1)
    for a in out:
        a.setflags(write=False)  # cached and shared
    return out


def _stack_votes(imgs: np.ndarray, bins: int, signed: bool) -> tuple[np.ndarray, ...]:
    """:func:`_orientation_votes` of each image of a ``(n, h, w)`` stack, raveled tile-major.

    ``Sobel(ksize=1)`` with ``BORDER_REFLECT_101`` is the exact integer central difference,
    0 on the first and last column (row); the votes are then looked up (:func:`_vote_lut`).
    """
    n, h, w = imgs.shape
    I = _buf("I", (n, h, w), np.int32)
    np.copyto(I, imgs)
    idx = _buf("idx", (n, h, w), np.int32)
    np.subtract(I[:, :, 2:], I[:, :, :-2], out=idx[:, :, 1:-1])  # gx
    idx[:, :, 0] = 0
    idx[:, :, -1] = 0
    idx *= _GSPAN
    idx[:, 1:-1, :] += I[:, 2:, :]  # + gy
    idx[:, 1:-1, :] -= I[:, :-2, :]
    idx += _G * _GSPAN + _G
    idx = idx.ravel()
    b0_of, nxt, v0_of, v1_of = _vote_lut(bins, signed)
    N = idx.size  # (mode="clip" lets take write into out unbuffered; every index is valid)
    b0 = np.take(b0_of, idx, out=_buf("b0", (N,), b0_of.dtype), mode="clip")
    return (b0, np.take(nxt, b0, out=_buf("b1", (N,), np.intp), mode="clip"),
            np.take(v0_of, idx, out=_buf("v0", (N,), np.float64), mode="clip"),
            np.take(v1_of, idx, out=_buf("v1", (N,), np.float64), mode="clip"))


def _hellinger_rows(hist: np.ndarray) -> np.ndarray:
    """:func:`_hellinger` of each row of ``hist`` (float32 out)."""
    hist = hist.astype(np.float64)  # a copy: normalised in place
    hist /= hist.sum(axis=1, keepdims=True) + _HELLINGER_EPS
    np.sqrt(hist, out=hist)
    norms = np.sqrt(np.array([np.dot(r, r) for r in hist], dtype=np.float64))
    hist /= (norms + _HELLINGER_EPS)[:, None]
    return hist.astype(np.float32)


@lru_cache(maxsize=32)
def _stack_cell_base(n: int, h: int, w: int, cell: int, grid: tuple[int, int], bins: int) -> np.ndarray:
    cells = grid[0] * grid[1]
    base = ((np.arange(n, dtype=np.intp) * cells)[:, None] + _cell_index(h, w, cell, grid[1])[None, :]).ravel() * bins
    base.setflags(write=False)
    return base


def _stack_hog(imgs: np.ndarray, cell: int, bins: int, grid: tuple[int, int], signed: bool) -> np.ndarray:
    """:func:`_hog` of each image: ``(n, grid cells * bins)`` float32."""
    n, h, w = imgs.shape
    b0, b1, v0, v1 = _stack_votes(imgs, bins, signed)
    m = grid[0] * grid[1] * bins
    base = _stack_cell_base(n, h, w, cell, grid, bins)
    i0 = np.add(base, b0, out=_buf("i0", base.shape, np.intp))
    hist = np.bincount(i0, v0, n * m)
    hist += np.bincount(np.add(base, b1, out=i0), v1, n * m)
    return _hellinger_rows(hist.reshape(n, m))


def _stack_hog_grid(imgs: np.ndarray, grids, bins: int, signed: bool, side: int) -> np.ndarray:
    """:func:`hog_grid` of each image: ``(n, sum(g^2) * bins)`` float32."""
    n, h, w = imgs.shape
    if max(h, w) > side:
        raise ValueError(f"image {h}x{w} is larger than side {side}")
    b0, b1, v0, v1 = _stack_votes(imgs, bins, signed)
    base = np.arange(n * h * w) * bins
    size = n * h * w * bins
    planes = (np.bincount(base + b0, v0, size) + np.bincount(base + b1, v1, size)).astype(np.float32)
    planes = planes.reshape(n, h, w * bins)
    blocks = []
    for g in grids:
        per_row = (_tents(side, g, h) @ planes).reshape(n, g, w, bins).transpose(0, 1, 3, 2)  # (t, r, b, x)
        pooled = (per_row @ _tents(side, g, w).T).transpose(0, 1, 3, 2)  # (t, r, c, b)
        blocks.append(_hellinger_rows(pooled.reshape(n, -1)))
    return np.concatenate(blocks, axis=1)


def _stack_features(stack: np.ndarray, cfg: FeatureConfig, plan: tuple | None) -> np.ndarray:
    """:func:`tile_features` of each tile of a ``(n, h, w)`` uint8 stack (settings checked)."""
    n, h, w = stack.shape
    if cfg.moment_norm or cfg.deskew:  # one warp per tile: not stackable
        hog_in = np.stack([hog_input(t, cfg) for t in stack])
    else:
        hog_in = stack
    if cfg.hog_grids:
        hog_vec = _stack_hog_grid(hog_in, tuple(int(g) for g in cfg.hog_grids), cfg.hog_bins, cfg.hog_signed,
                                  _hog_side(cfg))
    else:
        g = _hog_grid(cfg)
        hog_vec = _stack_hog(hog_in, cfg.hog_cell, cfg.hog_bins, (g, g), cfg.hog_signed)
    if not cfg.stats:
        return hog_vec
    levels = _stack_levels(stack)
    return np.concatenate([_stack_seed(stack, plan, levels), hog_vec, _stack_intensity(levels, h * w)], axis=1)


def tiles_features(tiles, cfg: FeatureConfig) -> np.ndarray:
    """:func:`tile_features` of many tiles at once: ``(len(tiles), feature_length(cfg))`` float32.

    Row ``i`` is bit for bit ``tile_features(tiles[i], cfg)`` (see the notes above this
    function: the same float operations in the same order, batched).  ``tiles`` is a
    sequence of 2-D ``uint8`` arrays (views are fine) or an ``(n, h, w)`` ``uint8`` stack;
    tiles of the same shape are stacked and computed together (a ``"shrink"`` frame has up
    to four shapes), in chunks of about ``_CHUNK_PIXELS`` pixels.  Bad input raises the
    same ``ValueError`` as :func:`tile_features`.
    """
    length = feature_length(cfg)  # checks the HOG settings, as tile_features does
    if isinstance(tiles, np.ndarray) and tiles.ndim == 3:
        _check_stack(tiles)
        if tiles.shape[0]:
            _check_size(tiles[0], cfg)
        groups = {tiles.shape[1:]: (np.arange(tiles.shape[0]), tiles)} if tiles.shape[0] else {}
    else:
        if not isinstance(tiles, (list, tuple)):
            tiles = list(tiles)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tiles):
            _check_gray(t, "tile")
            _check_size(t, cfg)
            by_shape.setdefault(t.shape, []).append(i)
        groups = {s: (np.array(ix), None) for s, ix in by_shape.items()}
    n = sum(len(ix) for ix, _ in groups.values())
    plan = _seed_plan(cfg) if cfg.stats and n else None
    out = np.empty((n, length), dtype=np.float32)
    for (h, w), (ix, stack) in groups.items():
        hog_px = _hog_side(cfg) ** 2 if cfg.moment_norm else h * w
        if min(h * w, hog_px) < _MIN_BATCH_PIXELS:
            for i in ix:
                out[i] = tile_features(stack[i] if stack is not None else tiles[i], cfg)
            continue
        per_tile = max(h * w, hog_px) * (cfg.hog_bins if cfg.hog_grids else 1)  # vote planes: bins/pixel
        n_chunks = -(-len(ix) * per_tile // _CHUNK_PIXELS)
        chunk = -(-len(ix) // n_chunks)  # even chunks
        for lo in range(0, len(ix), chunk):
            sel = ix[lo:lo + chunk]
            part = stack[lo:lo + chunk] if stack is not None else np.stack([tiles[i] for i in sel])
            out[sel] = _stack_features(part, cfg, plan)
    return out


def _check_size(tile: np.ndarray, cfg: FeatureConfig) -> None:
    h, w = tile.shape[-2:]
    if h > cfg.tile_size or w > cfg.tile_size:
        raise ValueError(f"tile {h}x{w} is larger than tile_size {cfg.tile_size}")
