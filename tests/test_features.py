"""Feature functions against hand-computed values on tiny arrays."""

import dataclasses

import cv2
import numpy as np
import pytest

from stream_processor.features import (
    binarize,
    contrast,
    deskew,
    edge,
    feature_length,
    feature_names,
    feature_sum,
    hog,
    intensity_stats,
    seed_features,
    tile_features,
)
from stream_processor.tiling import split
from tilestream.config import FeatureConfig

LAPLACE = ((-1, -1, -1), (-1, 8, -1), (-1, -1, -1))


def u8(rows):
    return np.array(rows, dtype=np.uint8)


# --- contrast -------------------------------------------------------------------------


def test_contrast_saturates_high():
    # 2*I + 10: 10, 210, 254, 256 -> 255, 410 -> 255, 520 -> 255
    out = contrast(u8([[0, 100, 122, 123, 200, 255]]), 2.0, 10.0)
    np.testing.assert_array_equal(out, u8([[10, 210, 254, 255, 255, 255]]))
    assert out.dtype == np.uint8


def test_contrast_negative_b_saturates_low():
    # I - 50: -50 -> 0, -40 -> 0, 0, 1, 205
    out = contrast(u8([[0, 10, 50, 51, 255]]), 1.0, -50.0)
    np.testing.assert_array_equal(out, u8([[0, 0, 0, 1, 205]]))


def test_contrast_negative_result_is_zero_not_absolute():
    # cv2.convertScaleAbs would give |−100| = 100 here
    np.testing.assert_array_equal(contrast(u8([[0, 100, 255]]), -1.0, 0.0), u8([[0, 0, 0]]))
    np.testing.assert_array_equal(contrast(u8([[0, 1, 255]]), -1.0, 255.0), u8([[255, 254, 0]]))


def test_contrast_rounds_half_to_even():
    # 0.5*I: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 127.5 -> 128; 0.5*4 = 2 exactly
    out = contrast(u8([[1, 3, 5, 255, 4]]), 0.5, 0.0)
    np.testing.assert_array_equal(out, u8([[0, 2, 2, 128, 2]]))


def test_contrast_works_on_views():
    img = u8([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(contrast(img[1:, 1:], 10.0, 1.0), u8([[41, 51], [71, 81]]))


# --- binarize -------------------------------------------------------------------------


def test_binarize_is_inclusive_at_T():
    out = binarize(u8([[0, 127, 128, 129, 255]]), 128)
    np.testing.assert_array_equal(out, u8([[0, 0, 255, 255, 255]]))


def test_binarize_extreme_thresholds():
    img = u8([[0, 1, 254, 255]])
    np.testing.assert_array_equal(binarize(img, 0), u8([[255, 255, 255, 255]]))
    np.testing.assert_array_equal(binarize(img, 255), u8([[0, 0, 0, 255]]))
    np.testing.assert_array_equal(binarize(img, 256), u8([[0, 0, 0, 0]]))


# --- edge -----------------------------------------------------------------------------


def test_edge_laplacian_single_white_pixel():
    img = np.zeros((5, 5), np.uint8)
    img[2, 2] = 255
    out = edge(img, LAPLACE)
    expected = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, -255, -255, -255, 0],
            [0, -255, 2040, -255, 0],
            [0, -255, -255, -255, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32


def test_edge_border_is_replicated():
    # white pixel in the corner; out-of-image samples copy the nearest border pixel, so at
    # (0, 0) the centre (8) and three replicated copies (-1 each) are white: 5*255.
    img = np.zeros((4, 4), np.uint8)
    img[0, 0] = 255
    expected = np.array(
        [[1275, -510, 0, 0], [-510, -255, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32
    )
    np.testing.assert_array_equal(edge(img, LAPLACE), expected)


def test_edge_asymmetric_kernel_x_is_columns():
    # w(i=+1, j=0) = 1 -> I_edge(x, y) = I_bin(x+1, y): a pixel at x=2, y=1 shows at x=1, y=1
    img = np.zeros((4, 4), np.uint8)
    img[1, 2] = 255
    out = edge(img, ((0, 0, 0), (0, 0, 1), (0, 0, 0)))
    expected = np.zeros((4, 4), np.float32)
    expected[1, 1] = 255
    np.testing.assert_array_equal(out, expected)


def test_edge_asymmetric_kernel_y_is_rows():
    # w(i=0, j=-1) = 1 -> I_edge(x, y) = I_bin(x, y-1): a pixel at x=2, y=1 shows at x=2, y=2
    img = np.zeros((4, 4), np.uint8)
    img[1, 2] = 255
    out = edge(img, ((0, 1, 0), (0, 0, 0), (0, 0, 0)))
    expected = np.zeros((4, 4), np.float32)
    expected[2, 2] = 255
    np.testing.assert_array_equal(out, expected)


def test_edge_is_correlation_single_pixel_gives_rotated_kernel():
    img = np.zeros((5, 5), np.uint8)
    img[2, 2] = 255
    out = edge(img, ((1, 2, 3), (4, 5, 6), (7, 8, 9)))
    expected = np.zeros((5, 5), np.float32)
    expected[1:4, 1:4] = np.array([[9, 8, 7], [6, 5, 4], [3, 2, 1]]) * 255
    np.testing.assert_array_equal(out, expected)


def test_edge_even_width_kernel_anchor():
    # 1x2 kernel [[1, 2]], anchor column 1: I_edge(x, y) = 1*I(x-1, y) + 2*I(x, y)
    img = u8([[0, 255, 0, 0]])
    np.testing.assert_array_equal(edge(img, ((1, 2),)), np.array([[0, 510, 255, 0]], np.float32))


# --- feature_sum ----------------------------------------------------------------------


def test_feature_sum_difference():
    E = np.array([[1, 4, 9, 16], [2, 0, 0, 5]], np.float32)
    # F(x) = E(x) - E(x-1), E(-1) = 0
    expected = np.array([[1, 3, 5, 7], [2, -2, 0, 5]], np.float32)
    np.testing.assert_array_equal(feature_sum(E, (1, -1)), expected)


def test_feature_sum_three_taps():
    E = np.array([[4, 8, 0, 16], [0, 0, 4, 0]], np.float32)
    # F(x) = .5 E(x) + .25 E(x-1) + .25 E(x-2)
    # row 0: 2, 4+1, 0+2+1, 8+0+2 ; row 1: 0, 0, 2, 0+1+0
    expected = np.array([[2, 5, 3, 10], [0, 0, 2, 1]], np.float32)
    out = feature_sum(E, (0.5, 0.25, 0.25))
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32


def test_feature_sum_runs_along_x_not_y():
    E = np.array([[1, 0], [0, 0]], np.float32)
    np.testing.assert_array_equal(feature_sum(E, (0, 1)), np.array([[0, 1], [0, 0]], np.float32))


def test_feature_sum_identity_and_long_kernel():
    E = np.array([[3, -1]], np.float32)
    np.testing.assert_array_equal(feature_sum(E, (1.0,)), E)
    # taps beyond the width only see zeros: F = 1*E(x) + 10*E(x-1) + 100*E(x-2) + ...
    np.testing.assert_array_equal(feature_sum(E, (1, 10, 100, 1000)), np.array([[3, 29]], np.float32))


# --- seed_features --------------------------------------------------------------------


def test_seed_features_single_pixel():
    img = np.zeros((4, 4), np.uint8)
    img[1, 1] = 200
    # I_bin: one white pixel; I_edge: 2040 there, -255 on its 8 neighbours, 0 elsewhere
    # mean F = (2040 - 8*255) / 16 = 0; mean |F| = 4080 / 16 / 255 = 1; 9/16 edges; 1/16 white
    out = seed_features(img, FeatureConfig(T=128))
    np.testing.assert_allclose(out, [0.0, 1.0, 0.5625, 0.0625], atol=1e-7)
    assert out.dtype == np.float32


def test_seed_features_contrast_moves_pixel_below_threshold():
    img = np.zeros((4, 4), np.uint8)
    img[1, 1] = 200
    np.testing.assert_array_equal(seed_features(img, FeatureConfig(T=128, a=0.5)), [0, 0, 0, 0])


# --- deskew ---------------------------------------------------------------------------


def test_deskew_diagonal_becomes_vertical():
    img = np.zeros((10, 10), np.uint8)
    img[np.arange(10), np.arange(10)] = 255  # x = y: mu11 / mu02 = 1
    # out(x, y) = img(x + (y - 5), y): white where x + y - 5 = y, i.e. column 5
    expected = np.zeros((10, 10), np.uint8)
    expected[:, 5] = 255
    np.testing.assert_array_equal(deskew(img, 10), expected)


def test_deskew_blank_is_unchanged_copy():
    img = np.zeros((8, 8), np.uint8)
    out = deskew(img, 8)
    np.testing.assert_array_equal(out, img)
    assert not np.shares_memory(out, img)


# --- hog ------------------------------------------------------------------------------


def test_hog_vertical_edge_all_in_horizontal_gradient_bin():
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 255
    # gx = I(x+1) - I(x-1) = 255 on columns 3 and 4, gy = 0: each of the 4 cells gets
    # 4*255 in bin 0 -> L1 .25 each -> sqrt .5 -> L2 norm 1
    expected = np.zeros((2, 2, 9), np.float32)
    expected[:, :, 0] = 0.5
    out = hog(img, 4, 9)
    assert out.shape == (36,) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected.ravel(), atol=1e-6)


def test_hog_orientation_is_unsigned():
    img = np.zeros((8, 8), np.uint8)
    img[:, :4] = 255  # falling edge: angle 180 -> bin 0
    expected = np.zeros((2, 2, 9), np.float32)
    expected[:, :, 0] = 0.5
    np.testing.assert_allclose(hog(img, 4, 9), expected.ravel(), atol=1e-6)


def test_hog_horizontal_edge_interpolates_between_bins():
    img = np.zeros((8, 8), np.uint8)
    img[4:, :] = 255
    # angle 90, 9 bins of 20 degrees: t = 4.5 -> half to bin 4, half to bin 5;
    # 8 equal entries -> 1/8 -> sqrt(1/8)
    expected = np.zeros((2, 2, 9), np.float32)
    expected[:, :, 4:6] = np.sqrt(1 / 8)
    np.testing.assert_allclose(hog(img, 4, 9), expected.ravel(), atol=1e-6)
    # 6 bins of 30 degrees: t = 3 exactly -> all in bin 3
    expected = np.zeros((2, 2, 6), np.float32)
    expected[:, :, 3] = 0.5
    np.testing.assert_allclose(hog(img, 4, 6), expected.ravel(), atol=1e-6)


def test_hog_cells_are_row_major():
    img = np.zeros((8, 8), np.uint8)
    img[:4, 2] = 255  # a short vertical line in the top-left cell only
    out = hog(img, 4, 4).reshape(2, 2, 4)
    # gx = +255 at column 1 and -255 at column 3 (both bin 0), rows 0..3 only
    # gy: at row 3 I(y+1)-I(y-1) = 0 - 255 at column 2, and at row 4 0 - 255 -> bin 2 (90 deg)
    # top-left cell: bin0 8*255, bin2 255; bottom-left: bin2 255; right cells: 0
    raw = np.array([[[8, 0, 1, 0], [0, 0, 0, 0]], [[0, 0, 1, 0], [0, 0, 0, 0]]], np.float64)
    expected = np.sqrt(raw / raw.sum())
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_hog_constant_tile_is_zero():
    out = hog(np.full((16, 16), 77, np.uint8), 8, 9)
    assert out.shape == (36,)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, np.zeros(36, np.float32))


def test_hog_rejects_non_multiple_of_cell():
    with pytest.raises(ValueError):
        hog(np.zeros((10, 12), np.uint8), 4, 9)


# --- intensity_stats ------------------------------------------------------------------


def test_intensity_stats_by_hand():
    img = u8([[0, 64], [128, 255]])
    # mean 447/4 = 111.75; deviations^2 sum 12488.0625 + 2280.0625 + 264.0625 + 20520.5625
    # = 35552.75, /4 = 8888.1875; bins (I >> 5): 0, 2, 4, 7
    expected = [
        111.75 / 255, np.sqrt(8888.1875) / 255, 0.0, 1.0,
        0.25, 0, 0.25, 0, 0.25, 0, 0, 0.25,
    ]
    out = intensity_stats(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_intensity_histogram_bin_edges():
    out = intensity_stats(u8([[31, 32, 223, 224]]))
    np.testing.assert_array_equal(out[4:], [0.25, 0.25, 0, 0, 0, 0, 0.25, 0.25])


# --- tile_features --------------------------------------------------------------------


def test_default_feature_length_is_160():
    assert feature_length(FeatureConfig()) == 4 + 16 * 9 + 12 == 160


@pytest.mark.parametrize(
    "cfg",
    [
        FeatureConfig(),
        FeatureConfig(deskew=True),
        FeatureConfig(tile_size=32, hog_cell=8, hog_bins=6),
        FeatureConfig(tile_size=48, hog_cell=16, hog_bins=12, w_i=(0.5, 0.25, 0.25), a=1.5, b=-20, T=90),
        FeatureConfig(tile_size=20, hog_cell=10, hog_bins=16, kernel=((1, 0, -1),)),
    ],
)
def test_feature_length_matches_vector(cfg):
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (cfg.tile_size, cfg.tile_size), dtype=np.uint8)
    v = tile_features(tile, cfg)
    assert v.dtype == np.float32
    assert v.shape == (feature_length(cfg),)
    assert np.isfinite(v).all()
    names = feature_names(cfg)
    assert len(names) == len(v) and len(set(names)) == len(names)


def test_expected_lengths_for_other_configs():
    assert feature_length(FeatureConfig(tile_size=32, hog_cell=8, hog_bins=6)) == 4 + 16 * 6 + 12
    assert feature_length(FeatureConfig(tile_size=48, hog_cell=16, hog_bins=12)) == 4 + 9 * 12 + 12


def test_feature_length_rejects_cell_not_dividing_tile():
    with pytest.raises(ValueError):
        feature_length(FeatureConfig(tile_size=64, hog_cell=24))


@pytest.mark.parametrize("deskew_on", [False, True])
def test_shrunk_edge_tiles_keep_the_length(deskew_on):
    cfg = FeatureConfig(edge_policy="shrink", deskew=deskew_on)
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (100, 130), dtype=np.uint8)
    parts = split(frame, cfg)
    assert {p.shape for _, p in parts} == {(64, 64), (64, 2), (36, 64), (36, 2)}
    for _, p in parts:
        v = tile_features(p, cfg)
        assert v.shape == (feature_length(cfg),) and np.isfinite(v).all()


def test_tile_features_layout():
    cfg = FeatureConfig(tile_size=8, hog_cell=4, hog_bins=9, T=128)
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 255
    v = tile_features(img, cfg)
    names = feature_names(cfg)
    # seed: half white; hog: bin 0 of each cell = 0.5; intensity: mean .5, std .5, min 0, max 1
    assert v[names.index("seed_white_frac")] == 0.5
    hog_part = v[4:40].reshape(2, 2, 9)
    np.testing.assert_allclose(hog_part[:, :, 0], 0.5, atol=1e-6)
    np.testing.assert_allclose(v[40:44], [0.5, 0.5, 0.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(v[44:], [0.5, 0, 0, 0, 0, 0, 0, 0.5])
    assert names[4] == "hog_r0_c0_b0" and names[13] == "hog_r0_c1_b0" and names[40] == "int_mean"


def test_deskew_flag_changes_only_hog():
    cfg = FeatureConfig(tile_size=16, hog_cell=8)
    img = np.zeros((16, 16), np.uint8)
    img[np.arange(16), np.arange(16)] = 255
    plain = tile_features(img, cfg)
    skewed = tile_features(img, dataclasses.replace(cfg, deskew=True))
    np.testing.assert_array_equal(plain[:4], skewed[:4])
    np.testing.assert_array_equal(plain[-12:], skewed[-12:])
    assert not np.allclose(plain[4:-12], skewed[4:-12])


def test_rejects_non_uint8_or_colour():
    with pytest.raises(ValueError):
        tile_features(np.zeros((64, 64), np.float32), FeatureConfig())
    with pytest.raises(ValueError):
        hog(np.zeros((8, 8, 3), np.uint8), 4, 9)


# --- moment normalisation, signed / pyramid HOG, stats option ---------------------------

from stream_processor.features import hog_grid, moment_normalize  # noqa: E402


def _centroid_and_sigmas(img):
    m = cv2.moments(img)
    xc, yc = m["m10"] / m["m00"], m["m01"] / m["m00"]
    return xc, yc, np.sqrt(m["mu20"] / m["m00"]), np.sqrt(m["mu02"] / m["m00"]), m["mu11"] / m["m00"]


def test_moment_normalize_centres_and_scales_a_bar():
    img = np.zeros((20, 20), np.uint8)
    img[2:14, 1:4] = 255  # a 3x12 bar near the top-left corner
    out = moment_normalize(img, 24, 20.0)
    assert out.shape == (24, 24) and out.dtype == np.uint8
    xc, yc, sx, sy, _ = _centroid_and_sigmas(out)
    assert abs(xc - 11.5) < 0.3 and abs(yc - 11.5) < 0.3  # centroid at the canvas centre
    # the longer (vertical) 4-sigma side becomes 20 px; the thin side widens, as sqrt(sin(pi/2 r))
    assert 4 * sy == pytest.approx(20.0, rel=0.06)
    r1 = np.sqrt((3 ** 2 - 1) / 12) / np.sqrt((12 ** 2 - 1) / 12)
    assert sx / sy == pytest.approx(np.sqrt(np.sin(np.pi / 2 * r1)), rel=0.15)  # (+ interpolation blur)
    assert sx / sy > r1 * 1.5


def test_moment_normalize_removes_slant():
    img = np.zeros((20, 20), np.uint8)
    for y in range(3, 17):  # a bar leaning right: x = 6 + (y - 3) / 2
        x = 6 + (y - 3) // 2
        img[y, x:x + 3] = 255
    assert abs(_centroid_and_sigmas(img)[4]) > 1
    out = moment_normalize(img, 20)
    assert abs(_centroid_and_sigmas(out)[4]) < 0.15 * abs(_centroid_and_sigmas(img)[4])


def test_moment_normalize_blank_and_errors():
    np.testing.assert_array_equal(moment_normalize(np.zeros((20, 20), np.uint8), 24), np.zeros((24, 24), np.uint8))
    with pytest.raises(ValueError):
        moment_normalize(np.zeros((20, 20), np.float32), 24)


def test_signed_orientation_tells_rising_from_falling_edges():
    rising = np.zeros((8, 8), np.uint8)
    rising[:, 4:] = 255
    falling = 255 - rising
    cfg = FeatureConfig(tile_size=8, hog_cell=4, hog_bins=16, hog_signed=True, stats=False)
    up, down = tile_features(rising, cfg).reshape(2, 2, 16), tile_features(falling, cfg).reshape(2, 2, 16)
    # 0 degrees -> bin 0; 180 degrees -> t = 180 * 16 / 360 = 8 -> bin 8
    np.testing.assert_allclose(up[:, :, 0], 0.5, atol=1e-6)
    np.testing.assert_allclose(down[:, :, 8], 0.5, atol=1e-6)
    assert up[:, :, 8].sum() == 0 and down[:, :, 0].sum() == 0
    unsigned = dataclasses.replace(cfg, hog_signed=False, hog_bins=8)
    np.testing.assert_array_equal(tile_features(rising, unsigned), tile_features(falling, unsigned))


def test_hog_grid_votes_bilinearly_between_cell_centres():
    img = np.zeros((8, 8), np.uint8)
    img[:, 2:] = 255  # gx = 255 on columns 1 and 2, every row
    # 2x2 grid over 8 px: centres 1.5 and 5.5, weight 1 - |x - c| / 4.  Columns 1, 2 give cell 0
    # 0.875 + 0.875 and cell 1 0 + 0.125; every row weighs 3.5 in each row of cells.
    out = hog_grid(img, (2,), 9).reshape(2, 2, 9)
    np.testing.assert_allclose(out[:, 0, 0], np.sqrt(1.75 / 3.75), atol=1e-6)
    np.testing.assert_allclose(out[:, 1, 0], np.sqrt(0.125 / 3.75), atol=1e-6)
    assert out[:, :, 1:].sum() == 0
    # box cells of 4 px would give the right column nothing
    np.testing.assert_allclose(hog(img, 4, 9).reshape(2, 2, 9)[:, 1, 0], 0.0)


def test_hog_grid_pyramid_blocks_are_normalised_separately():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    v = hog_grid(img, (4, 6), 16, signed=True)
    assert v.shape == ((16 + 36) * 16,) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:256]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v[256:]), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v[:256], hog_grid(img, (4,), 16, signed=True))
    with pytest.raises(ValueError):
        hog_grid(img, (), 16)


def test_new_options_lengths_names_and_layout():
    cfg = FeatureConfig(tile_size=20, hog_bins=16, hog_signed=True, moment_norm=True, norm_size=24, norm_box=20.0,
                        hog_grids=(4, 6), stats=False)
    assert feature_length(cfg) == (16 + 36) * 16 == 832
    names = feature_names(cfg)
    assert len(names) == 832 and len(set(names)) == 832
    assert names[0] == "hog_g4_r0_c0_b0" and names[256] == "hog_g6_r0_c0_b0"
    with_stats = dataclasses.replace(cfg, stats=True)
    assert feature_length(with_stats) == 4 + 832 + 12
    rng = np.random.default_rng(4)
    tile = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    a, b = tile_features(tile, cfg), tile_features(tile, with_stats)
    np.testing.assert_array_equal(b[4:-12], a)
    np.testing.assert_array_equal(b[:4], seed_features(tile, with_stats))
    # the HOG sees the moment-normalised tile
    np.testing.assert_array_equal(a, hog_grid(moment_normalize(tile, 24, 20.0), (4, 6), 16, True, 24))
    # moment_norm takes precedence over deskew; a canvas must be a multiple of hog_cell for box cells
    np.testing.assert_array_equal(tile_features(tile, dataclasses.replace(cfg, deskew=True)), a)
    with pytest.raises(ValueError):
        feature_length(dataclasses.replace(cfg, hog_grids=(), hog_cell=10))


@pytest.mark.parametrize("moment_norm", [False, True])
def test_new_options_on_shrunk_edge_tiles(moment_norm):
    cfg = FeatureConfig(edge_policy="shrink", hog_grids=(2, 4), hog_signed=True, moment_norm=moment_norm)
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (100, 130), dtype=np.uint8)
    for _, p in split(frame, cfg):
        v = tile_features(p, cfg)
        assert v.shape == (feature_length(cfg),) and np.isfinite(v).all()
