"""Training jobs on real data: OpenCV's digits (held-out error), image folders, reports, saved models."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from classifier.model import ModelMismatch, TileModel, confusion_png, confusion_text
from classifier.train import (
    DIGITS_FEATURES,
    DIGITS_HYPER,
    digits_dataset,
    digits_split,
    folder_dataset,
    train_digits,
    train_folder,
)
from stream_processor.features import feature_length, tile_features
import sampledata as samples
from tilestream.config import FeatureConfig


@pytest.fixture(scope="module")
def digits():
    images, labels = samples.load_digits(samples.path("digits.png"))
    return images, labels


@pytest.fixture(scope="module")
def digits_model() -> tuple[TileModel, list[str]]:
    lines: list[str] = []
    return train_digits(progress=lines.append), lines


# --- digits ---------------------------------------------------------------------------


def test_opencv_split_is_digits_py():
    train, test = digits_split(5000)
    shuffle = np.random.RandomState(321).permutation(5000)
    assert len(train) == 4500 and len(test) == 500
    np.testing.assert_array_equal(np.concatenate([train, test]), shuffle)
    assert not set(train) & set(test)


def test_digit_features_are_the_processors_tiles(digits):
    images, labels = digits
    X, y = digits_dataset(DIGITS_FEATURES, progress=lambda _: None)
    assert X.shape == (5000, feature_length(DIGITS_FEATURES)) and X.dtype == np.float32
    np.testing.assert_array_equal(y, labels.astype(str))
    for i in (0, 1, 777, 2500, 4999):  # a digit on its own gives the same vector as its tile of the sheet
        np.testing.assert_array_equal(X[i], tile_features(images[i], DIGITS_FEATURES))


def test_digits_reach_one_percent_held_out_error(digits, digits_model):
    images, labels = digits
    model, lines = digits_model
    m = model.metrics
    train, test = digits_split(5000)
    assert m["n_train"] == 4500 and m["n_held_out"] == 500

    # Recompute the held-out result independently: each digit alone through tile_features.
    X_test = np.stack([tile_features(images[i], model.feature_config) for i in test])
    pred = model.estimator.predict(X_test)
    errors = int((pred != labels[test].astype(str)).sum())
    assert errors == m["held_out_errors"]
    assert errors <= 5, f"{errors}/500 held-out errors (goal: at most 1.0%)"
    assert m["held_out_error_rate"] == pytest.approx(errors / 500)

    # No held-out digit was used for training: the SVM was fitted on 4,500 vectors and all its
    # support vectors are training digits.
    svc = model.estimator[-1].calibrated_classifiers_[0].estimator
    assert svc.shape_fit_ == (4500, feature_length(DIGITS_FEATURES))
    X_train = {tile_features(images[i], model.feature_config).tobytes() for i in train}
    held = {x.tobytes() for x in X_test}
    sv = {v.astype(np.float32).tobytes() for v in svc.support_vectors_}
    assert sv <= X_train and not sv & held

    cm = np.array(m["confusion_matrix"]["matrix"])
    assert m["confusion_matrix"]["labels"] == [str(d) for d in range(10)]
    assert cm.sum() == 500 and cm.trace() == 500 - errors
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(labels[test], minlength=10))
    assert len(m["held_out_misclassified"]) == errors
    assert {r["index"] for r in m["held_out_misclassified"]} <= set(test.tolist())

    assert m["cv_folds"] == 5 and len(m["cv_fold_accuracies"]) == 5
    assert 0.98 <= m["cv_accuracy"] <= 1.0
    assert m["cv_accuracy"] == pytest.approx(1 - m["cv_errors"] / 4500, abs=1e-4)
    assert m["hyperparameters"] == DIGITS_HYPER["svm"]
    assert m["feature_us_per_tile"] > 0 and m["train_seconds"] > 0
    assert sum("cv fold" in line for line in lines) == 5
    assert any(line.startswith("held-out:") for line in lines)
    assert all("  " + row in lines for row in m["confusion_text"].splitlines())  # printed as it goes
    json.dumps(m)  # the metrics go into the model's JSON metadata


def test_train_digits_refuses_other_tile_sizes():
    with pytest.raises(ValueError, match="tile_size=20"):
        train_digits(FeatureConfig(tile_size=32), progress=lambda _: None)


# --- image folders --------------------------------------------------------------------


def _write_folder(root, digits, classes=(("zero", 0), ("seven", 7)), per_class=12):
    images, labels = digits
    for name, digit in classes:
        d = root / name
        d.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == digit)[:per_class]):
            img = images[i]
            if k % 3 == 1:  # colour and a larger size: converted to gray and resized
                img = cv2.cvtColor(cv2.resize(img, (40, 40), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR)
            assert cv2.imwrite(str(d / f"{k:03d}.png"), img)
    (root / "zero" / "notes.txt").write_text("not an image")
    (root / "zero" / "broken.png").write_bytes(b"not a png at all")
    (root / ".hidden").mkdir()


def test_folder_dataset_reads_classes(tmp_path, digits):
    _write_folder(tmp_path, digits)
    lines: list[str] = []
    X, y = folder_dataset(tmp_path, DIGITS_FEATURES, lines.append)
    assert X.shape == (24, feature_length(DIGITS_FEATURES))
    assert sorted(set(y)) == ["seven", "zero"] and (y == "zero").sum() == 12
    assert any("skipped 1 unreadable" in line and "broken.png" in line for line in lines)
    # the first "zero" image was written as is: exactly the digit's own tile vector
    images, labels = digits
    np.testing.assert_array_equal(X[list(y).index("zero")], tile_features(images[np.flatnonzero(labels == 0)[0]], DIGITS_FEATURES))


def test_folder_dataset_needs_two_classes(tmp_path, digits):
    _write_folder(tmp_path, digits, classes=(("zero", 0),))
    with pytest.raises(ValueError, match="at least 2"):
        folder_dataset(tmp_path, DIGITS_FEATURES, lambda _: None)


def test_train_folder_trains_and_predicts(tmp_path, digits):
    _write_folder(tmp_path, digits)
    lines: list[str] = []
    model = train_folder(tmp_path, DIGITS_FEATURES, "svm", lines.append, **DIGITS_HYPER["svm"])
    m = model.metrics
    assert model.classes == ["seven", "zero"]
    assert m["n_train"] + m["n_held_out"] == 24 and m["n_held_out"] >= 2
    assert np.array(m["confusion_matrix"]["matrix"]).sum() == m["n_held_out"]
    assert m["cv_folds"] >= 2 and m["cv_accuracy"] is not None
    assert any("cv fold" in line for line in lines)
    # unseen zeros and sevens (not in the folder) are recognised
    images, labels = digits
    unseen = np.concatenate([np.flatnonzero(labels == 0)[100:130], np.flatnonzero(labels == 7)[100:130]])
    pred = model.estimator.predict(np.stack([tile_features(images[i], DIGITS_FEATURES) for i in unseen]))
    truth = np.where(labels[unseen] == 0, "zero", "seven")
    assert (pred == truth).mean() >= 0.9
    p = model.predict_proba(np.stack([tile_features(images[i], DIGITS_FEATURES) for i in unseen[:3]]))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)


# --- confusion report -----------------------------------------------------------------


def test_confusion_png_shape_and_shading():
    matrix = [[9, 1, 0], [0, 5, 5], [2, 0, 8]]
    img = confusion_png(matrix, ["a", "b", "c"], cell=30)
    assert img.shape == (120, 120, 3) and img.dtype == np.uint8

    def shade(i, j):  # a pixel of cell (true i, predicted j) away from its text and grid lines
        return tuple(int(v) for v in img[(i + 1) * 30 + 3, (j + 1) * 30 + 3])

    fractions = {(i, j): matrix[i][j] / sum(matrix[i]) for i in range(3) for j in range(3)}
    for (a, fa), (b, fb) in [(p, q) for p in fractions.items() for q in fractions.items()]:
        if fa == fb:
            assert shade(*a) == shade(*b)
        elif fa < fb:  # more of the row: a darker cell
            assert sum(shade(*a)) > sum(shade(*b)), (a, b)
    assert shade(0, 2) == (255, 255, 255)  # no count: white
    assert len({shade(*k) for k in fractions}) == len(set(fractions.values()))
    assert confusion_png(np.eye(10, dtype=int) * 50, list(range(10))).shape == (440, 440, 3)
    with pytest.raises(ValueError):
        confusion_png(matrix, ["a", "b"])


def test_confusion_text():
    text = confusion_text([[9, 1], [0, 10]], ["cat", "dog"])
    rows = text.splitlines()
    assert rows[0].split()[:3] == ["true\\pred", "cat", "dog"]
    assert rows[2].split() == ["cat", "9", "1", "|", "1"] and rows[3].split() == ["dog", "0", "10", "|", "0"]


# --- saved models ---------------------------------------------------------------------


def test_saved_model_keeps_predictions_and_is_refused_on_other_features(tmp_path, digits):
    images, labels = digits
    train, test = digits_split(5000)
    sub = train[:800]
    X = np.stack([tile_features(images[i], DIGITS_FEATURES) for i in sub])
    model = TileModel.train(X, labels[sub], DIGITS_FEATURES, kind="svm", **DIGITS_HYPER["svm"])
    model.metrics = {"confusion_matrix": {"labels": model.classes, "matrix": np.eye(10, dtype=int).tolist()}}
    X_test = np.stack([tile_features(images[i], DIGITS_FEATURES) for i in test[:100]])
    before = model.predict_proba(X_test)

    path = model.save(tmp_path / "m" / "digits.skops")
    png = cv2.imread(str(path) + ".confusion.png")
    assert png is not None and png.shape == (440, 440, 3)

    loaded = TileModel.load(path, expected_digest=DIGITS_FEATURES.digest())
    np.testing.assert_array_equal(loaded.predict_proba(X_test), before)
    np.testing.assert_array_equal(loaded.estimator.predict(X_test), model.estimator.predict(X_test))
    assert loaded.feature_config.digest() == DIGITS_FEATURES.digest()
    np.testing.assert_array_equal(tile_features(images[test[0]], loaded.feature_config), X_test[0])
    assert loaded.classes == model.classes and loaded.kind == "svm"

    other = dataclasses.replace(DIGITS_FEATURES, hog_grids=(4,))
    with pytest.raises(ModelMismatch, match="retrain"):
        TileModel.load(path, expected_digest=other.digest())
    with pytest.raises(ModelMismatch):
        TileModel.load(path, expected_digest=FeatureConfig().digest())

    # metadata edited to claim other features without a matching digest: refused too
    meta_path = tmp_path / "m" / "digits.skops.json"
    meta = json.loads(meta_path.read_text())
    meta["feature_config"]["hog_grids"] = [4]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelMismatch, match="inconsistent"):
        TileModel.load(path)


def test_digits_preset_digest_tracks_the_new_options():
    variants = [
        dataclasses.replace(DIGITS_FEATURES, **kw)
        for kw in ({"moment_norm": False}, {"norm_size": 20}, {"norm_box": 18.0}, {"hog_signed": False},
                   {"hog_grids": (4,)}, {"stats": True})
    ]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and DIGITS_FEATURES.digest() not in digests
