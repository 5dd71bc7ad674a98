"""Training datasets and the train job, on the processor's own feature functions.

``scene``: a per-tile person/background model for a fixed camera, from a video of that
camera. Labels are weak, derived from OpenCV's MOG2 background subtractor (a tile is
"person" when enough of it is moving foreground, "background" when almost none of it is;
ambiguous tiles are left out); the model itself only sees the single-frame tile features.
The frame label is "person" when any tile is (noisy-OR over tiles).
"""

from __future__ import annotations

import time
from typing import Callable

import cv2
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix

from tilestream.config import FeatureConfig
from tilestream.samples import iter_video_frames

from classifier.model import TileModel
from stream_processor.pipeline import image_tile_features


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
