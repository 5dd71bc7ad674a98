"""Training datasets and the train job, on the processor's own feature functions.

``scene``: a per-tile person/background model for a fixed camera, from a video of that
camera. Labels are weak, derived from OpenCV's MOG2 background subtractor (a tile is
"person" when enough of it is moving foreground, "background" when almost none of it is;
ambiguous tiles are left out); the model itself only sees the single-frame tile features.
The frame label is "person" when any tile is (noisy-OR over tiles).

``digits``: OpenCV's ``digits.png`` (5,000 handwritten digits, 20x20, 500 per class) read
as a digit sheet through :func:`stream_processor.pipeline.image_tile_features` with
``tile_size=20``, so every digit is one tile and gets exactly the vector the processor
serves.  The held-out split is OpenCV's own (``samples/python/digits.py``):
``RandomState(321).permutation(5000)``, the first 90 % to train, the last 500 to test.
:data:`DIGITS_FEATURES` and :data:`DIGITS_HYPER` were chosen by cross-validation on the
4,500 training digits only (see :data:`DIGITS_TUNING`); the held-out digits are used
for nothing but the final report.

``folder``: any image-folder dataset (one sub-folder per class), each image converted to
grayscale and resized to one ``tile_size x tile_size`` tile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from joblib import Parallel, delayed
from sklearn.metrics import accuracy_score, confusion_matrix
from sklearn.model_selection import StratifiedKFold, train_test_split

from tilestream.config import FeatureConfig
from sampledata import iter_video_frames, load_digits

from classifier.model import KINDS, TileModel, confusion_png, confusion_text, make_estimator
from stream_processor.features import feature_length, tile_features
from stream_processor.pipeline import image_tile_features

__all__ = [
    "DIGITS_FEATURES",
    "DIGITS_HYPER",
    "DIGITS_TUNING",
    "confusion_png",
    "confusion_text",
    "digits_dataset",
    "digits_split",
    "folder_dataset",
    "train_digits",
    "train_folder",
    "train_scene_model",
    "tune_digits",
]


def scene_dataset(
    video: str,
    cfg: FeatureConfig,
    max_frames: int = 400,
    every: int = 3,
    warmup: int = 40,
    fg_person: float = 0.12,
    fg_background: float = 0.01,
    progress: Callable[[str], None] = print,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, frame_index) for tiles of ``video`` with MOG2-derived labels."""
    mog = cv2.createBackgroundSubtractorMOG2(history=200, varThreshold=25, detectShadows=False)
    X, y, where = [], [], []
    for i, frame in enumerate(iter_video_frames(video, max_frames=max_frames)):
        fg = mog.apply(frame)
        if i < warmup or i % every:
            continue
        fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        for tile, vec in image_tile_features(gray, cfg):
            moving = float(np.count_nonzero(fg[tile.y:tile.y + tile.h, tile.x:tile.x + tile.w])) / (tile.w * tile.h)
            if moving >= fg_person:
                label = "person"
            elif moving <= fg_background:
                label = "background"
            else:
                continue
            X.append(vec)
            y.append(label)
            where.append(i)
        if i % 60 == 0:
            progress(f"  scene dataset: frame {i}/{max_frames}, {len(y)} labelled tiles")
    return np.asarray(X, np.float32), np.asarray(y), np.asarray(where)


def balance(X: np.ndarray, y: np.ndarray, seed: int = 0, ratio: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Keep every minority-class sample and at most ``ratio`` times as many of each other class."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    cap = int(counts.min() * ratio)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:cap] for c in classes])
    keep.sort()
    return X[keep], y[keep]


def train_scene_model(
    video: str, cfg: FeatureConfig, kind: str = "svm", max_frames: int = 400, progress: Callable[[str], None] = print
) -> TileModel:
    t0 = time.monotonic()
    X, y, where = scene_dataset(video, cfg, max_frames=max_frames, progress=progress)
    split = int(max_frames * 0.75)  # train on the earlier frames, test on the later ones
    train, test = where < split, where >= split
    Xtr, ytr = balance(X[train], y[train])
    progress(f"training {kind} on {len(ytr)} tiles ({dict(zip(*np.unique(ytr, return_counts=True)))}) ...")
    model = TileModel.train(Xtr, ytr, cfg, kind=kind, frame_rule="any:person")
    pred = model.estimator.predict(X[test])
    labels = model.classes
    model.metrics = {
        "dataset": "scene-mog2",
        "held_out_tiles": int(test.sum()),
        "held_out_accuracy": round(float(accuracy_score(y[test], pred)), 4),
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(y[test], pred, labels=labels).tolist()},
        "train_seconds": round(time.monotonic() - t0, 2),
    }
    progress(f"held-out tile accuracy {model.metrics['held_out_accuracy']:.3f} on {int(test.sum())} tiles "
             f"({time.monotonic() - t0:.1f}s)")
    return model


# --------------------------------------------------------------------------- digits

#: Feature settings for digits (20x20 tiles): moment normalisation onto a 24x24 canvas (the
#: longer 4-sigma side to 20 px), signed 16-bin HOG pooled on 4x4 and 6x6 grids of
#: overlapping cells, each Hellinger-normalised; HOG only (832 values).
DIGITS_FEATURES = FeatureConfig(
    tile_size=20,
    hog_bins=16,
    moment_norm=True,
    norm_size=24,
    norm_box=20.0,
    hog_signed=True,
    hog_grids=(4, 6),
    stats=False,
)

#: Hyperparameters for :data:`DIGITS_FEATURES` (used when ``train_digits`` gets that preset).
#: The vector is two unit-norm Hellinger blocks, so it is not standardised.
DIGITS_HYPER: dict[str, dict[str, Any]] = {
    "svm": {"C": 3.0, "gamma": 1.5, "scale": False},
    "logistic": {"C": 30.0, "scale": False},
}

DIGITS_TUNING = (
    "Chosen by 5-fold stratified cross-validation, repeated with shuffle seeds 0 and 1, on the "
    "4,500 training digits of OpenCV's split only (held-out digits never looked at), scored by "
    "the mean number of out-of-fold errors of an RBF SVC (errors/4500, each fold trained on 3,600): "
    "OpenCV's own features (deskew, 2x2 cells, 16 bins; unsigned here) 170; signed orientation 99.5; "
    "deskew + 4x4 overlapping cells 63.5; moment normalisation instead of deskew 49; 24x24 canvas, "
    "5x5 cells 46; 4x4 + 6x6 cells 43.5 (3x5 48.5, 4x5x6 45.5, 3x4x6 46, 12 bins 44, 20x20 canvas 45); "
    "seed/intensity values added: no gain (46.5 vs 46). SVC grid C in {3, 10} x gamma in "
    "{1.0, 1.5, 2.0, 2.5} for two blocks: C=3, gamma=1.5 best (C=10 within 0.5). Training on "
    "dilated/eroded copies of the training digits gained nothing (43.0-44.0) and was dropped; "
    "standardised features with gamma='scale' (make_estimator's defaults): 67. "
    "Logistic (unscaled): C in {10, 30, 100, 300} -> 57.5, 54.5, 56, 61.5: C=30. "
    "tune_digits() reruns such a search."
)

DIGITS_SPLIT_SEED = 321
DIGITS_TRAIN_FRACTION = 0.9
DIGIT_TILE = 20


def digits_split(n: int, seed: int = DIGITS_SPLIT_SEED, train_fraction: float = DIGITS_TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's digits.py split: ``(train indices, test indices)`` into the sheet order.

    ``shuffle = np.random.RandomState(seed).permutation(n)``; the first
    ``int(train_fraction * n)`` are the training digits, the rest the held-out ones.
    """
    shuffle = np.random.RandomState(seed).permutation(n)
    n_train = int(train_fraction * n)
    return shuffle[:n_train], shuffle[n_train:]


def _check_digit_cfg(cfg: FeatureConfig) -> None:
    if cfg.tile_size != DIGIT_TILE or cfg.overlap != 0:
        raise ValueError(
            f"digits are {DIGIT_TILE}x{DIGIT_TILE} tiles of the sheet: the feature configuration needs "
            f"tile_size={DIGIT_TILE} and overlap=0 (got tile_size={cfg.tile_size}, overlap={cfg.overlap})"
        )


def _digits_features(cfg: FeatureConfig, path: Path | str | None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(X, y, seconds spent in image_tile_features)`` for the whole digit sheet."""
    from sampledata import path as sample_path

    _check_digit_cfg(cfg)
    sheet_path = Path(path) if path is not None else sample_path("digits.png")
    cells, labels = load_digits(sheet_path)
    sheet = cv2.imread(str(sheet_path), cv2.IMREAD_GRAYSCALE)
    if sheet is None:
        raise OSError(f"cannot read {sheet_path} as an image")
    t0 = time.perf_counter()
    tiles = image_tile_features(sheet, cfg)  # the processor's own code path
    seconds = time.perf_counter() - t0
    if len(tiles) != len(cells):
        raise ValueError(f"{sheet_path}: {len(tiles)} tiles but {len(cells)} digits")
    for i, (tile, _) in enumerate(tiles):  # tiles are row-major, like load_digits' cells
        if tile.index != i or not np.array_equal(sheet[tile.y:tile.y + tile.h, tile.x:tile.x + tile.w], cells[i]):
            raise ValueError(f"{sheet_path}: tile {i} is not digit {i}")
    X = np.stack([vec for _, vec in tiles]).astype(np.float32, copy=False)
    return X, labels.astype(str), seconds


def digits_dataset(cfg: FeatureConfig, path: Path | str | None = None, progress: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` for all 5,000 digits in sheet order (class labels ``"0"``..``"9"``).

    The sheet (``sampledata.path("digits.png")`` unless ``path``) goes through
    :func:`image_tile_features` with ``cfg`` (``tile_size=20``, ``overlap=0``), i.e. the
    processor's code path; each tile is checked to be the digit :func:`load_digits` cuts.
    """
    X, y, seconds = _digits_features(cfg, path)
    progress(f"digits: {len(y)} tiles -> {X.shape[1]} features each, {seconds / len(y) * 1e6:.0f} us per tile")
    return X, y


def _fit_kwargs(kind: str, y: np.ndarray, hyper: dict[str, Any]) -> dict[str, Any]:
    """``hyper`` with the SVM's calibration folds capped by the smallest class (tiny datasets)."""
    kw = dict(hyper)
    if kind == "svm":
        smallest = int(np.unique(y, return_counts=True)[1].min())
        folds = min(int(kw.get("calibration_folds", 5)), smallest)
        if folds < 2:
            raise ValueError(f"the calibrated SVM needs at least 2 training samples per class, the smallest class has {smallest}")
        kw["calibration_folds"] = folds
    return kw


def _fit_predict(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, kind: str, hyper: dict[str, Any]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    est = make_estimator(kind, **_fit_kwargs(kind, y[train], hyper))
    est.fit(X[train], y[train])
    return est.predict(X[test]), time.perf_counter() - t0


def _cross_validate(
    X: np.ndarray, y: np.ndarray, kind: str, hyper: dict[str, Any], folds: int, seed: int, n_jobs: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Stratified k-fold CV of the full (calibrated) estimator on ``X, y``."""
    smallest = int(np.unique(y, return_counts=True)[1].min())
    folds = min(int(folds), smallest)
    if folds < 2:
        progress(f"cv: skipped (the smallest class has {smallest} training samples)")
        return {"cv_folds": 0, "cv_accuracy": None, "cv_fold_accuracies": [], "cv_errors": None}
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y))
    inner = {k: v for k, v in hyper.items()}
    results = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_fit_predict)(X, y, tr, te, kind, inner) for tr, te in splits
    )
    accs, errors = [], 0
    for i, ((tr, te), (pred, secs)) in enumerate(zip(splits, results), 1):
        e = int((pred != y[te]).sum())
        errors += e
        accs.append(round(1.0 - e / len(te), 4))
        progress(f"  cv fold {i}/{folds}: accuracy {accs[-1]:.4f} ({e}/{len(te)} errors, {secs:.1f}s)")
    acc = 1.0 - errors / len(y)
    progress(f"cv: {folds}-fold accuracy {acc:.4f} ({errors}/{len(y)} out-of-fold errors)")
    return {"cv_folds": folds, "cv_accuracy": round(acc, 4), "cv_fold_accuracies": accs, "cv_errors": errors}


def _train_and_report(
    X: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    cfg: FeatureConfig,
    kind: str,
    hyper: dict[str, Any],
    folds: int,
    cv_seed: int,
    n_jobs: int,
    progress: Callable[[str], None],
) -> tuple[TileModel, dict[str, Any]]:
    """CV on the training part, one final fit on all of it, then the held-out report."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} ({', '.join(KINDS)})")
    t0 = time.perf_counter()
    cv = _cross_validate(X[train], y[train], kind, hyper, folds, cv_seed, n_jobs, progress)
    t_cv = time.perf_counter() - t0
    progress(f"fitting {kind} on {len(train)} training samples ({hyper}) ...")
    t1 = time.perf_counter()
    kw = _fit_kwargs(kind, y[train], hyper)
    if kind == "svm":
        kw["n_jobs"] = n_jobs
    model = TileModel.train(X[train], y[train], cfg, kind=kind, **kw)
    t_fit = time.perf_counter() - t1
    pred = model.estimator.predict(X[test])
    truth = y[test]
    labels = model.classes
    matrix = confusion_matrix(truth, pred, labels=labels)
    errors = int((pred != truth).sum())
    wrong = np.flatnonzero(pred != truth)
    text = confusion_text(matrix, labels)
    progress(f"held-out: {errors}/{len(test)} errors ({100.0 * errors / len(test):.2f}%), accuracy {1 - errors / len(test):.4f}")
    for line in text.splitlines():
        progress("  " + line)
    report = {
        **cv,
        "cv_seconds": round(t_cv, 2),
        "hyperparameters": {k: v for k, v in hyper.items()},
        "n_train": int(len(train)),
        "n_held_out": int(len(test)),
        "held_out_accuracy": round(1.0 - errors / len(test), 4),
        "held_out_errors": errors,
        "held_out_error_rate": round(errors / len(test), 4),
        "held_out_misclassified": [
            {"index": int(test[i]), "true": str(truth[i]), "predicted": str(pred[i])} for i in wrong
        ],
        "confusion_matrix": {"labels": labels, "matrix": matrix.tolist()},
        "confusion_text": text,
        "fit_seconds": round(t_fit, 2),
    }
    return model, report


def train_digits(
    cfg: FeatureConfig = DIGITS_FEATURES,
    kind: str = "svm",
    progress: Callable[[str], None] = print,
    *,
    path: Path | str | None = None,
    folds: int = 5,
    cv_seed: int = 0,
    n_jobs: int = 2,
    **hyper: Any,
) -> TileModel:
    """Train a digit model on OpenCV's digits.png with the processor's features.

    Features: :func:`digits_dataset` (each digit one tile of the sheet, ``tile_size=20``).
    Split: :func:`digits_split` (OpenCV's: seed 321, 4,500 train / 500 held out).
    Reports ``folds``-fold stratified CV accuracy of the full estimator on the 4,500 training
    digits, then fits on all of them and reports held-out accuracy and the confusion matrix;
    everything lands in ``model.metrics`` (``TileModel.save`` also writes the matrix as
    ``<path>.confusion.png``).  ``hyper`` goes to :func:`classifier.model.make_estimator`
    (``C``, ``gamma``, ``scale``, ``calibration_folds``); unset keys default to
    :data:`DIGITS_HYPER` when ``cfg`` is :data:`DIGITS_FEATURES`, otherwise to
    ``make_estimator``'s own defaults.  ``n_jobs`` processes run the CV folds and the
    calibration folds.
    """
    t0 = time.perf_counter()
    X, y, feat_s = _digits_features(cfg, path)
    us = feat_s / len(y) * 1e6
    progress(f"digits: {len(y)} tiles of the digit sheet (tile_size {cfg.tile_size}) -> {X.shape[1]} features each, "
             f"{us:.0f} us per tile")
    train, test = digits_split(len(y))
    progress(f"digits: OpenCV's split (RandomState({DIGITS_SPLIT_SEED})): {len(train)} train, {len(test)} held out")
    preset = cfg.digest() == DIGITS_FEATURES.digest()  # (a config read from JSON holds lists, not tuples)
    defaults = DIGITS_HYPER.get(kind, {}) if preset else {}
    hyper = {**defaults, **hyper}
    model, report = _train_and_report(X, y, train, test, cfg, kind, hyper, folds, cv_seed, n_jobs, progress)
    total = time.perf_counter() - t0
    model.metrics = {
        "dataset": "opencv-digits",
        "split": f"OpenCV samples/python/digits.py: RandomState({DIGITS_SPLIT_SEED}).permutation({len(y)}), "
                 f"first {len(train)} train, last {len(test)} held out",
        "feature_digest": cfg.digest(),
        "feature_length": int(X.shape[1]),
        "feature_us_per_tile": round(us, 1),
        **report,
        "tuning": DIGITS_TUNING if preset and hyper == DIGITS_HYPER.get(kind) else "given by the caller",
        "train_seconds": round(total, 2),
    }
    progress(f"digits {kind}: cv accuracy {report['cv_accuracy']}, held-out {report['held_out_errors']}/{len(test)} errors, "
             f"{total:.1f}s in all")
    return model


def tune_digits(
    candidates: dict[str, FeatureConfig],
    grid: list[dict[str, Any]],
    kind: str = "svm",
    folds: int = 5,
    seeds: tuple[int, ...] = (0, 1),
    n_jobs: int = 2,
    path: Path | str | None = None,
    progress: Callable[[str], None] = print,
) -> list[tuple[str, dict[str, Any], float]]:
    """Cross-validated search on the 4,500 *training* digits only (never the held-out 500).

    For each feature configuration and each ``make_estimator`` keyword set of ``grid``: the
    mean, over ``seeds``, of the total out-of-fold errors of ``folds``-fold stratified CV of
    the uncalibrated classifier (``predict`` of the SVC / logistic model).  Returns
    ``[(name, hyper, mean errors)]`` sorted best first.  How :data:`DIGITS_FEATURES` and
    :data:`DIGITS_HYPER` were chosen (see :data:`DIGITS_TUNING`).
    """
    from sklearn.base import clone

    results = []
    for name, cfg in candidates.items():
        X, y, _ = _digits_features(cfg, path)
        train, _ = digits_split(len(y))
        X, y = X[train], y[train]
        splits = [s for seed in seeds for s in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y)]
        for hyper in grid:
            est = make_estimator(kind, **hyper)
            if kind == "svm":  # the SVC alone: calibration does not change the CV ranking much
                est.steps[-1] = (est.steps[-1][0], est.steps[-1][1].estimator)

            def errors(tr, te, est=est):
                return int((clone(est).fit(X[tr], y[tr]).predict(X[te]) != y[te]).sum())

            e = sum(Parallel(n_jobs=n_jobs)(delayed(errors)(tr, te) for tr, te in splits)) / len(seeds)
            results.append((name, dict(hyper), e))
            progress(f"tune: {name} {hyper}: {e:.1f} errors / {len(y)}")
    return sorted(results, key=lambda r: r[2])


# --------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")


def _to_tile(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    if (h, w) == (size, size):
        return img
    shrink = h > size or w > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def folder_dataset(root: Path | str, cfg: FeatureConfig, progress: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` for an image-folder dataset: ``root/<class>/<image>``, one sub-folder per class.

    Sub-folders and files are taken in sorted order (hidden ones skipped); files whose
    extension is one of :data:`IMAGE_EXTENSIONS` are read as grayscale
    (``cv2.IMREAD_GRAYSCALE``), resized to ``tile_size x tile_size`` (``INTER_AREA`` when
    shrinking, ``INTER_LINEAR`` otherwise) and described by :func:`tile_features` as one
    tile.  Unreadable images are skipped and reported.  Labels are the sub-folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    X, y, skipped = [], [], []
    t0 = time.perf_counter()
    for cls_dir in classes:
        n = 0
        for f in sorted(cls_dir.iterdir()):
            if f.name.startswith(".") or not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if img is None or img.size == 0:
                skipped.append(f.name)
                continue
            X.append(tile_features(_to_tile(img, cfg.tile_size), cfg))
            y.append(cls_dir.name)
            n += 1
        progress(f"  folder dataset: class {cls_dir.name!r}: {n} images")
    if skipped:
        progress(f"  folder dataset: skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    if len(set(y)) < 2:
        raise ValueError(f"{root}: need images in at least 2 class sub-folders, found {sorted(set(y))}")
    secs = time.perf_counter() - t0
    progress(f"folder dataset: {len(y)} images in {len(set(y))} classes ({secs / len(y) * 1e6:.0f} us per image)")
    return np.stack(X).astype(np.float32, copy=False), np.asarray(y)


def train_folder(
    root: Path | str,
    cfg: FeatureConfig,
    kind: str = "svm",
    progress: Callable[[str], None] = print,
    *,
    test_fraction: float = 0.2,
    folds: int = 5,
    seed: int = 0,
    n_jobs: int = 2,
    **hyper: Any,
) -> TileModel:
    """Train a tile model on an image-folder dataset (:func:`folder_dataset`).

    A stratified held-out split (``test_fraction`` of the images, at least one per class,
    ``random_state=seed``), ``folds``-fold stratified CV on the training part (fewer folds
    when a class is smaller), a final fit on the training part, then held-out accuracy and
    the confusion matrix, all in ``model.metrics`` as for :func:`train_digits`.  ``hyper``
    goes to :func:`classifier.model.make_estimator`.
    """
    t0 = time.perf_counter()
    X, y = folder_dataset(root, cfg, progress)
    idx = np.arange(len(y))
    n_classes = len(np.unique(y))
    n_test = max(n_classes, int(round(test_fraction * len(y))))
    if n_test >= len(y):
        raise ValueError(f"{root}: {len(y)} images are too few for a held-out split with {n_classes} classes")
    train, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    train, test = np.sort(train), np.sort(test)
    progress(f"folder: stratified split {len(train)} train, {len(test)} held out")
    model, report = _train_and_report(X, y, train, test, cfg, kind, dict(hyper), folds, seed, n_jobs, progress)
    model.metrics = {
        "dataset": f"folder:{Path(root).name}",
        "split": f"stratified train_test_split(test_size={n_test}, random_state={seed})",
        "feature_digest": cfg.digest(),
        "feature_length": int(feature_length(cfg)),
        **report,
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    return model
