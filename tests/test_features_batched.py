"""The batched feature path (tiles_features) gives bit for bit the per-tile vectors (tile_features).

Equality is checked on the float32 bit patterns (``view(uint32)``), so even a sign of zero or a
last-bit rounding difference fails: the batched path keeps the per-tile float operations and
their order (see the notes above ``tiles_features`` in stream_processor/features.py).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

import stream_processor.features as F
from classifier.train import DIGITS_FEATURES
from sampledata import iter_video_frames
from stream_processor.features import feature_length, tile_features, tiles_features
from stream_processor.pipeline import image_tile_features
from stream_processor.tiling import split
from tilestream.config import FeatureConfig

BASE = FeatureConfig()
CONFIGS = {
    "default": BASE,
    "digits": DIGITS_FEATURES,
    "moment_norm": dataclasses.replace(BASE, moment_norm=True),
    "moment_norm_canvas": dataclasses.replace(BASE, moment_norm=True, norm_size=48, norm_box=40.0),
    "hog_signed": dataclasses.replace(BASE, hog_signed=True),
    "hog_grids": dataclasses.replace(BASE, hog_grids=(2, 3)),
    "no_stats": dataclasses.replace(BASE, stats=False),
    "deskew": dataclasses.replace(BASE, deskew=True),
    "shrink": dataclasses.replace(BASE, edge_policy="shrink"),
    "shrink_all_options": dataclasses.replace(BASE, edge_policy="shrink", moment_norm=True, hog_signed=True,
                                              hog_grids=(2, 4), deskew=True),
    "drop_overlap": dataclasses.replace(BASE, edge_policy="drop", overlap=16),
    "pad_overlap": dataclasses.replace(BASE, tile_size=48, overlap=16),
    # not integer: the seed sums go through cv2.sumElems / cv2.norm per tile
    "float_chain": dataclasses.replace(BASE, a=1.3, b=-10.0, T=100, w_i=(1.0, -0.5, 0.25),
                                       kernel=((0.1, 0.2, 0.3), (0.25, -1.7, 0.333), (0.1, 0.1, 0.1))),
    "integer_w_i": dataclasses.replace(BASE, w_i=(1.0, -2.0, 1.0), kernel=((1.0, 0.0, -1.0),)),
    # integer, but sums of |F| far above 2^24 with many significant bits: exact only in double
    "big_integers": dataclasses.replace(BASE, w_i=(3.0, -2.0), kernel=((0.0, -5.0, 0.0), (-7.0, 37.0, -11.0),
                                                                       (0.0, -3.0, 0.0))),
    # integer, but too large for the 0/1 integer path: the float path
    "huge_integers": dataclasses.replace(BASE, w_i=(1.0,), kernel=((30000.0, 5000.0),)),
    # 56 taps: filter2D takes its DFT path, so the edge map stays per tile
    "big_kernel": dataclasses.replace(BASE, kernel=tuple(tuple(float(v) for v in r) for r in
                                                         np.random.default_rng(1).integers(-3, 4, (7, 8)))),
    # 8x8 tiles, shrunk ones smaller: below _MIN_BATCH_PIXELS, tile_features itself
    "small_tiles": dataclasses.replace(BASE, tile_size=8, hog_cell=4, edge_policy="shrink"),
}


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    diff = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert diff.size == 0, (f"{diff.size} values differ, first at {np.unravel_index(diff[0], got.shape)}: "
                            f"max |diff| {np.abs(got.astype(np.float64) - want).max()}")


def per_tile(gray: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    return np.stack([tile_features(p, cfg) for _, p in split(gray, cfg)])


def random_images():
    rng = np.random.default_rng(12)
    yield rng.integers(0, 256, (130, 200), dtype=np.uint8)  # noise: every gradient there is
    yield (rng.random((101, 157)) < 0.5).astype(np.uint8) * 255  # binary: +-255 gradients
    yield cv2.GaussianBlur(rng.integers(0, 256, (77, 139), dtype=np.uint8), (7, 7), 2)  # odd sizes
    yield np.full((70, 70), 37, np.uint8)  # flat: zero HOG, zero std


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_equals_per_tile_on_random_images(name):
    cfg = CONFIGS[name]
    for gray in random_images():
        pairs = split(gray, cfg)
        assert pairs
        got = tiles_features([p for _, p in pairs], cfg)
        assert got.shape == (len(pairs), feature_length(cfg))
        assert_bits_equal(got, per_tile(gray, cfg))


@pytest.mark.parametrize("name", ["default", "digits", "moment_norm", "hog_signed", "hog_grids", "no_stats",
                                  "deskew", "shrink", "float_chain"])
def test_batched_equals_per_tile_on_vtest_frames(name, vtest_path):
    cfg = CONFIGS[name]
    for k, frame in enumerate(iter_video_frames(str(vtest_path), max_frames=40)):
        if k % 13:
            continue
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        for img in (gray, gray[:571, :761]):  # the whole frame; one whose edge tiles are partial
            tiles, X = zip(*image_tile_features(img, cfg))
            assert [t.index for t in tiles] == list(range(len(tiles)))
            assert_bits_equal(np.stack(X), per_tile(img, cfg))


def test_more_than_one_chunk_and_stack_input(monkeypatch):
    gray = np.random.default_rng(3).integers(0, 256, (300, 260), dtype=np.uint8)
    stack = np.stack([p for _, p in split(gray[:256, :256], BASE)])
    want = per_tile(gray[:256, :256], BASE)
    monkeypatch.setattr(F, "_CHUNK_PIXELS", 3 * 64 * 64)  # 16 tiles in chunks of 3
    assert_bits_equal(tiles_features(stack, BASE), want)
    assert_bits_equal(tiles_features(list(stack), BASE), want)
    assert_bits_equal(tiles_features(iter(list(stack)), BASE), want)
    assert tiles_features([], BASE).shape == (0, feature_length(BASE))


@pytest.mark.parametrize("bins,signed", [(9, False), (16, True), (7, True), (1, False)])
def test_vote_table_is_the_per_tile_votes_of_every_gradient(bins, signed):
    """The lookup table holds, for each of the 511^2 integer gradients, what the per-tile
    cartToPolar path gives: computed here 64x64 tile by tile (the per-tile array size)."""
    b0, nxt, v0, v1 = F._vote_lut(bins, signed)
    table = (b0, nxt[b0], v0, v1)
    g = np.arange(-255, 256, dtype=np.float32)
    gx, gy = np.repeat(g, 511), np.tile(g, 511)
    n = gx.size - gx.size % 4096
    for lo in range(0, n, 4096):
        got = F._polar_votes(gx[lo:lo + 4096].reshape(64, 64), gy[lo:lo + 4096].reshape(64, 64), bins, signed)
        for a, b in zip(got, table):
            assert np.array_equal(a, b[lo:lo + 4096])
    # the last partial block as a tile of its own shape
    rest = gx.size - n
    got = F._polar_votes(gx[n:].reshape(1, rest), gy[n:].reshape(1, rest), bins, signed)
    for a, b in zip(got, table):
        assert np.array_equal(a, b[n:])


def test_sobel_votes_are_the_table_lookup_on_real_tiles(vtest_path):
    frame = next(iter_video_frames(str(vtest_path), max_frames=1))
    stack = np.stack([p for _, p in split(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), BASE)])
    got = F._stack_votes(stack, 9, False)
    want = [np.concatenate(a) for a in zip(*(F._orientation_votes(t, 9, False) for t in stack))]
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [
    np.zeros((64, 64), np.float32),
    np.zeros((64, 64, 3), np.uint8),
    np.zeros((64, 0), np.uint8),
    np.zeros((65, 64), np.uint8),  # larger than tile_size
    "not an array",
])
def test_bad_tiles_are_refused_like_tile_features(bad):
    with pytest.raises(ValueError) as per:
        tile_features(bad, BASE)
    with pytest.raises(ValueError) as batched:
        tiles_features([np.zeros((64, 64), np.uint8), bad], BASE)
    assert str(batched.value) == str(per.value)


def test_bad_stacks_and_settings_are_refused():
    with pytest.raises(ValueError, match="3-D"):
        tiles_features(np.zeros((2, 64, 64), np.int16), BASE)
    with pytest.raises(ValueError, match="empty"):
        tiles_features(np.zeros((2, 0, 64), np.uint8), BASE)
    with pytest.raises(ValueError, match="larger than tile_size"):
        tiles_features(np.zeros((2, 65, 64), np.uint8), BASE)
    bad_cell = dataclasses.replace(BASE, hog_cell=15)
    with pytest.raises(ValueError) as per:
        tile_features(np.zeros((64, 64), np.uint8), bad_cell)
    with pytest.raises(ValueError) as batched:
        tiles_features([np.zeros((64, 64), np.uint8)], bad_cell)
    assert str(batched.value) == str(per.value)
    with pytest.raises(ValueError, match="w_i"):
        tiles_features([np.zeros((64, 64), np.uint8)], dataclasses.replace(BASE, w_i=()))
    with pytest.raises(ValueError):  # a colour frame: its tiles are refused
        image_tile_features(np.zeros((128, 128, 3), np.uint8), BASE)
    with pytest.raises(ValueError):
        image_tile_features(np.zeros((128, 128), np.float32), BASE)
    assert image_tile_features(np.zeros((0, 0), np.uint8), BASE) == []


def test_scene_model_labels_do_not_change(scene_model, vtest_path):
    from classifier.model import TileModel

    model = TileModel.load(scene_model)
    cfg = model.feature_config
    changed = total = 0
    for k, frame in enumerate(iter_video_frames(str(vtest_path), max_frames=300)):
        if k % 10:
            continue
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        batched = np.stack([v for _, v in image_tile_features(gray, cfg)])
        ref = per_tile(gray, cfg)
        a, b = model.estimator.predict(batched), model.estimator.predict(ref)
        changed += int((a != b).sum())
        total += a.size
    assert total == 30 * 108 and changed == 0


def test_threads_do_not_share_scratch_buffers():
    """The chunk temporaries are per-thread scratch arrays: frames computed in parallel
    threads (the processor's executor) give the same vectors as one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (192 + 8 * k, 256 - 8 * k), dtype=np.uint8) for k in range(8)]
    cfgs = [BASE, CONFIGS["shrink"], CONFIGS["hog_signed"], DIGITS_FEATURES]
    want = [[per_tile(f, c) for c in cfgs] for f in frames]

    def run(f):
        return [np.stack([v for _, v in image_tile_features(f, c)]) for c in cfgs]

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, ref in zip(pool.map(run, frames), want):
                for g, r in zip(got, ref):
                    assert_bits_equal(g, r)
