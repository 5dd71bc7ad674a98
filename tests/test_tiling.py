"""Tiling geometry and tile extraction, against hand-computed coordinates and pixels."""

import dataclasses

import numpy as np
import pytest

from stream_processor.tiling import Tile, extract_tile, split, tile_grid
from tilestream.config import FeatureConfig


def boxes(tiles):
    return [(t.x, t.y, t.w, t.h) for t in tiles]


# --- tile_grid: 100 rows x 130 columns, tile 64 --------------------------------------


@pytest.mark.parametrize("policy", ["pad", "shrink"])
def test_grid_100x130_pad_and_shrink(policy):
    tiles = tile_grid(100, 130, 64, 0, policy)
    # rows start at 0, 64 (64 + 64 >= 100 stops); columns at 0, 64, 128 (128 + 64 >= 130 stops)
    assert boxes(tiles) == [
        (0, 0, 64, 64), (64, 0, 64, 64), (128, 0, 2, 64),
        (0, 64, 64, 36), (64, 64, 64, 36), (128, 64, 2, 36),
    ]
    assert [t.index for t in tiles] == [0, 1, 2, 3, 4, 5]


def test_grid_100x130_drop():
    assert boxes(tile_grid(100, 130, 64, 0, "drop")) == [(0, 0, 64, 64), (64, 0, 64, 64)]


@pytest.mark.parametrize("policy", ["pad", "shrink"])
def test_grid_100x130_overlap16(policy):
    # stride 48: rows 0, 48 (48 + 64 = 112 >= 100 stops); columns 0, 48, 96 (96 + 64 >= 130 stops)
    tiles = tile_grid(100, 130, 64, 16, policy)
    assert boxes(tiles) == [
        (0, 0, 64, 64), (48, 0, 64, 64), (96, 0, 34, 64),
        (0, 48, 64, 52), (48, 48, 64, 52), (96, 48, 34, 52),
    ]


def test_grid_100x130_overlap16_drop():
    # complete tiles only: rows {0} (48 + 64 > 100), columns {0, 48} (96 + 64 > 130)
    tiles = tile_grid(100, 130, 64, 16, "drop")
    assert boxes(tiles) == [(0, 0, 64, 64), (48, 0, 64, 64)]
    assert [t.index for t in tiles] == [0, 1]


def test_grid_default_arguments_are_pad_without_overlap():
    assert boxes(tile_grid(100, 130, 64)) == boxes(tile_grid(100, 130, 64, 0, "pad"))
    assert len(tile_grid(100, 130, 64)) == 6


def test_no_redundant_trailing_tile_with_overlap():
    # width 100, tile 64, overlap 36 (stride 28): the tile at 56 already reaches 120 >= 100,
    # so a naive range(0, 100, 28) start at 84 would be fully covered.
    tiles = tile_grid(10, 100, 64, 36, "pad")
    assert [t.x for t in tiles] == [0, 28, 56]
    assert [t.w for t in tiles] == [64, 64, 44]
    # width 128, tile 64, overlap 32: 0, 32, 64 (64 + 64 == 128 ends exactly), not 96
    assert [t.x for t in tile_grid(64, 128, 64, 32, "shrink")] == [0, 32, 64]
    assert [t.x for t in tile_grid(64, 128, 64, 32, "drop")] == [0, 32, 64]


def test_exact_division_gives_no_extra_tile():
    assert boxes(tile_grid(128, 128, 64, 0, "pad")) == [
        (0, 0, 64, 64), (64, 0, 64, 64), (0, 64, 64, 64), (64, 64, 64, 64)
    ]


def test_frame_smaller_than_tile():
    assert boxes(tile_grid(30, 50, 64, 0, "pad")) == [(0, 0, 50, 30)]
    assert boxes(tile_grid(30, 50, 64, 8, "shrink")) == [(0, 0, 50, 30)]
    assert tile_grid(30, 50, 64, 0, "drop") == []
    assert tile_grid(0, 50, 64, 0, "pad") == []


@pytest.mark.parametrize(
    "tile_size, overlap, policy",
    [(0, 0, "pad"), (64, -1, "pad"), (64, 64, "pad"), (64, 70, "shrink"), (64, 0, "crop"), (64, 0, "")],
)
def test_grid_rejects_bad_parameters(tile_size, overlap, policy):
    with pytest.raises(ValueError):
        tile_grid(100, 130, tile_size, overlap, policy)


def test_grid_rejects_negative_frame():
    with pytest.raises(ValueError):
        tile_grid(-1, 10, 4)


def test_tile_is_frozen():
    t = Tile(0, 1, 2, 3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.x = 5


# --- extract_tile ---------------------------------------------------------------------

# 5 rows x 6 columns, value = 6*row + col:
#  0  1  2  3  4  5
#  6  7  8  9 10 11
# 12 13 14 15 16 17
# 18 19 20 21 22 23
# 24 25 26 27 28 29
IMG = np.arange(30, dtype=np.uint8).reshape(5, 6)


def test_grid_5x6_tile4():
    assert boxes(tile_grid(5, 6, 4, 0, "pad")) == [(0, 0, 4, 4), (4, 0, 2, 4), (0, 4, 4, 1), (4, 4, 2, 1)]


def test_extract_pad_replicates_right_edge():
    out = extract_tile(IMG, Tile(1, 4, 0, 2, 4), 4, "pad")
    expected = np.array(
        [[4, 5, 5, 5], [10, 11, 11, 11], [16, 17, 17, 17], [22, 23, 23, 23]], dtype=np.uint8
    )
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8


def test_extract_pad_replicates_bottom_edge():
    out = extract_tile(IMG, Tile(2, 0, 4, 4, 1), 4, "pad")
    np.testing.assert_array_equal(out, np.array([[24, 25, 26, 27]] * 4, dtype=np.uint8))


def test_extract_pad_replicates_corner():
    out = extract_tile(IMG, Tile(3, 4, 4, 2, 1), 4, "pad")
    np.testing.assert_array_equal(out, np.array([[28, 29, 29, 29]] * 4, dtype=np.uint8))


def test_extract_shrink_is_a_smaller_view():
    out = extract_tile(IMG, Tile(1, 4, 0, 2, 4), 4, "shrink")
    np.testing.assert_array_equal(out, np.array([[4, 5], [10, 11], [16, 17], [22, 23]], dtype=np.uint8))
    assert np.shares_memory(out, IMG)


def test_extract_full_tile_is_a_view_even_under_pad():
    out = extract_tile(IMG, Tile(0, 1, 1, 4, 4), 4, "pad")
    np.testing.assert_array_equal(
        out, np.array([[7, 8, 9, 10], [13, 14, 15, 16], [19, 20, 21, 22], [25, 26, 27, 28]], dtype=np.uint8)
    )
    assert np.shares_memory(out, IMG)


def test_extract_rejects_tile_outside_image():
    with pytest.raises(ValueError):
        extract_tile(IMG, Tile(0, 4, 0, 4, 4), 4, "shrink")
    with pytest.raises(ValueError):
        extract_tile(IMG, Tile(0, 0, 0, 2, 2), 4, "nope")


# --- split ----------------------------------------------------------------------------


def test_split_pad_gives_full_size_tiles():
    frame = np.zeros((100, 130), dtype=np.uint8)
    frame[:, 129] = 200  # last column
    parts = split(frame, FeatureConfig(tile_size=64, edge_policy="pad"))
    assert [t.index for t, _ in parts] == [0, 1, 2, 3, 4, 5]
    assert all(p.shape == (64, 64) for _, p in parts)
    # the right-edge tile covers columns 128, 129; its padding replicates column 129
    right = parts[2][1]
    assert (right[:, 0] == 0).all() and (right[:, 1:] == 200).all()


def test_split_shrink_and_drop_shapes():
    frame = np.zeros((100, 130), dtype=np.uint8)
    shapes = [p.shape for _, p in split(frame, FeatureConfig(tile_size=64, edge_policy="shrink"))]
    assert shapes == [(64, 64), (64, 64), (64, 2), (36, 64), (36, 64), (36, 2)]
    shapes = [p.shape for _, p in split(frame, FeatureConfig(tile_size=64, overlap=16, edge_policy="drop"))]
    assert shapes == [(64, 64), (64, 64)]
