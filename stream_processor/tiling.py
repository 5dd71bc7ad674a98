"""Cutting a frame into square tiles.

Small pure functions in the style of OpenCV's ``samples/python/digits.py``: no I/O, no
Kafka, numpy views wherever possible.

Geometry
--------
Along one axis of length ``L`` with tile size ``S`` and overlap ``o`` (``0 <= o < S``)
tiles start at ``p_k = k * s`` with stride ``s = S - o``:

* ``"pad"`` / ``"shrink"``: ``p_0 = 0`` and a next tile is started only while the previous
  one has not reached the end, i.e. while ``p_k + S < L``.  The count is therefore
  ``n = 1 + ceil(max(0, L - S) / s)`` and no tile starts at a position already fully
  covered by its predecessor (no redundant trailing tile when ``o > 0``).  The covered
  extent of a tile is ``min(S, L - p_k)``; under ``"pad"`` :func:`extract_tile` replicates
  the border of an edge tile up to ``S x S``, under ``"shrink"`` the edge tile stays smaller.
* ``"drop"``: only complete tiles, ``p_k + S <= L``, so ``n = floor((L - S) / s) + 1`` when
  ``L >= S`` and ``0`` otherwise.

Tiles are numbered row-major (``index = row * n_cols + col``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tilestream.config import FeatureConfig

EDGE_POLICIES = ("pad", "shrink", "drop")


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile: its row-major ``index`` and the frame region ``[y:y+h, x:x+w]`` it covers."""

    index: int
    x: int
    y: int
    w: int
    h: int


def _check_params(tile_size: int, overlap: int, edge_policy: str) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"tile_size must be an integer >= 1, got {tile_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be an integer with 0 <= overlap < tile_size ({tile_size}), got {overlap!r}")
    if edge_policy not in EDGE_POLICIES:
        raise ValueError(f"edge_policy must be one of {', '.join(EDGE_POLICIES)}, got {edge_policy!r}")


def _starts(length: int, tile_size: int, stride: int, edge_policy: str) -> list[int]:
    """Tile start positions along one axis (see the module docstring for the rule)."""
    if length <= 0:
        return []
    if edge_policy == "drop":
        if length < tile_size:
            return []
        return list(range(0, length - tile_size + 1, stride))
    n = 1 + -(-max(0, length - tile_size) // stride)  # 1 + ceil(max(0, L - S) / s)
    return [k * stride for k in range(n)]


def tile_grid(height: int, width: int, tile_size: int, overlap: int = 0, edge_policy: str = "pad") -> list[Tile]:
    """Row-major tiles of a ``height x width`` frame with stride ``tile_size - overlap``.

    ``w = min(tile_size, width - x)`` and ``h = min(tile_size, height - y)`` are the part of
    the frame actually covered; they are smaller than ``tile_size`` only for right/bottom
    edge tiles under ``"pad"`` and ``"shrink"``.  A frame smaller than one tile gives one
    tile (``"pad"``/``"shrink"``) or none (``"drop"``); an empty frame gives none.

    Raises ``ValueError`` unless ``tile_size >= 1``, ``0 <= overlap < tile_size``, the
    policy is one of ``"pad"``, ``"shrink"``, ``"drop"`` and the frame size is ``>= 0``.
    """
    _check_params(tile_size, overlap, edge_policy)
    if height < 0 or width < 0:
        raise ValueError(f"frame size must be non-negative, got {height}x{width}")
    stride = tile_size - overlap
    ys = _starts(int(height), tile_size, stride, edge_policy)
    xs = _starts(int(width), tile_size, stride, edge_policy)
    return [
        Tile(r * len(xs) + c, x, y, min(tile_size, width - x), min(tile_size, height - y))
        for r, y in enumerate(ys)
        for c, x in enumerate(xs)
    ]


def extract_tile(image: np.ndarray, tile: Tile, tile_size: int, edge_policy: str) -> np.ndarray:
    """The pixels of ``tile``: ``image[y:y+h, x:x+w]``.

    Returns a view into ``image`` except under ``"pad"`` for an edge tile (``w`` or ``h``
    smaller than ``tile_size``), which is a ``tile_size x tile_size`` copy made with
    ``cv2.copyMakeBorder(..., BORDER_REPLICATE)`` on the bottom and right: padded pixel
    ``(x', y')`` takes the value of ``(min(x', w-1), min(y', h-1))``.
    Meant for grayscale 2-D arrays (a trailing channel axis also works).
    """
    if edge_policy not in EDGE_POLICIES:
        raise ValueError(f"edge_policy must be one of {', '.join(EDGE_POLICIES)}, got {edge_policy!r}")
    if image.ndim < 2:
        raise ValueError(f"image must be at least 2-D, got shape {image.shape}")
    height, width = image.shape[:2]
    if (
        tile.x < 0 or tile.y < 0 or tile.w < 1 or tile.h < 1
        or tile.x + tile.w > width or tile.y + tile.h > height
        or tile.w > tile_size or tile.h > tile_size
    ):
        raise ValueError(f"{tile} does not fit a {height}x{width} image with tile_size {tile_size}")
    view = image[tile.y:tile.y + tile.h, tile.x:tile.x + tile.w]
    if edge_policy == "pad" and (tile.w < tile_size or tile.h < tile_size):
        return cv2.copyMakeBorder(view, 0, tile_size - tile.h, 0, tile_size - tile.w, cv2.BORDER_REPLICATE)
    return view


def split(image: np.ndarray, cfg: FeatureConfig) -> list[tuple[Tile, np.ndarray]]:
    """``[(tile, extract_tile(image, tile, ...)) for tile in tile_grid(...)]`` for ``cfg``."""
    if image.ndim < 2:
        raise ValueError(f"image must be at least 2-D, got shape {image.shape}")
    tiles = tile_grid(image.shape[0], image.shape[1], cfg.tile_size, cfg.overlap, cfg.edge_policy)
    return [(t, extract_tile(image, t, cfg.tile_size, cfg.edge_policy)) for t in tiles]
