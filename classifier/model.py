"""The tile model: a scikit-learn estimator plus what it needs to be served safely.

Saved with skops (no plain pickle): loading executes no code from the file and accepts only
scikit-learn / numpy types. The artifact records the feature configuration and its digest,
and :meth:`TileModel.load` refuses a model whose digest differs from the processor's.

Frame aggregation (``frame_rule``):

* ``"mean"``: P(c | frame) = mean over tiles of P(c | tile).
* ``"any:<class>"``: noisy-OR for one class — P(c | frame) = 1 - prod(1 - P(c | tile)),
  the other classes share the rest in proportion to their mean tile probability.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from tilestream.config import FeatureConfig

KINDS = ("svm", "logistic")


class ModelMismatch(ValueError):
    pass


def make_estimator(
    kind: str,
    C: float = 10.0,
    gamma: str | float = "scale",
    scale: bool = True,
    calibration_folds: int = 5,
    n_jobs: int | None = None,
) -> Pipeline:
    """The estimator of a :class:`TileModel`: ``[StandardScaler] -> classifier``.

    * ``"svm"``: RBF ``SVC(C, gamma)`` with Platt-calibrated probabilities
      (``CalibratedClassifierCV(method="sigmoid", ensemble=False)``: sigmoids fitted on
      ``calibration_folds``-fold out-of-fold decision values, then one SVC refitted on all
      the data; ``SVC(probability=True)`` is deprecated in scikit-learn 1.9).
    * ``"logistic"``: multinomial ``LogisticRegression(C)``.

    ``scale=False`` leaves out the ``StandardScaler`` (for already normalised vectors such
    as Hellinger HOG blocks, whose relative scale carries information).  ``n_jobs`` runs the
    calibration folds in parallel.
    """
    steps: list[Any] = [StandardScaler()] if scale else []
    if kind == "svm":
        svc = SVC(kernel="rbf", C=C, gamma=gamma, random_state=0)
        cal = CalibratedClassifierCV(svc, method="sigmoid", ensemble=False, cv=int(calibration_folds), n_jobs=n_jobs)
        return make_pipeline(*steps, cal)
    if kind == "logistic":
        return make_pipeline(*steps, LogisticRegression(C=C, max_iter=2000))
    raise ValueError(f"unknown model kind {kind!r} ({', '.join(KINDS)})")


def confusion_text(matrix, labels) -> str:
    """A confusion matrix as a fixed-width table: rows are true classes, columns predictions."""
    m = np.asarray(matrix, dtype=np.int64)
    labels = [str(x) for x in labels]
    if m.shape != (len(labels), len(labels)):
        raise ValueError(f"matrix of shape {m.shape} does not match {len(labels)} labels")
    w = max([len("true\\pred"), *(len(x) for x in labels), *(len(str(v)) for v in m.ravel()), 3])
    head = "true\\pred".rjust(w) + " " + " ".join(x.rjust(w) for x in labels) + " | " + "errors".rjust(6)
    lines = [head, "-" * len(head)]
    for i, x in enumerate(labels):
        errors = int(m[i].sum() - m[i, i])
        lines.append(x.rjust(w) + " " + " ".join(str(int(v)).rjust(w) for v in m[i]) + " | " + str(errors).rjust(6))
    return "\n".join(lines)


def _cell_colour(v: float) -> tuple[int, int, int]:
    """BGR shade for a row fraction ``v`` in [0, 1]: white (0) to dark blue (1), strictly monotone.

    The ramp follows ``sqrt(v)`` so that a few errors in a row of hundreds still show.
    """
    v = float(np.sqrt(min(max(v, 0.0), 1.0)))
    return (int(round(255 - 115 * v)), int(round(255 - 225 * v)), int(round(255 - 245 * v)))


def confusion_png(matrix, labels, cell: int = 40) -> np.ndarray:
    """Draw a confusion matrix with OpenCV: a BGR ``uint8`` image, ready for ``cv2.imwrite``.

    The image is ``(n + 1) * cell`` pixels square for ``n`` labels: the first row and column
    hold the labels (predicted across, true down), every other cell its count, shaded by
    the square root of the count's fraction of its row (white = none, dark blue = the whole row; see
    :func:`_cell_colour`), with 1-pixel grey grid lines.  Pure: no file is written.
    """
    import cv2

    m = np.asarray(matrix, dtype=np.float64)
    labels = [str(x) for x in labels]
    n = len(labels)
    if n == 0 or m.shape != (n, n):
        raise ValueError(f"matrix of shape {m.shape} does not match {n} labels")
    if cell < 12:
        raise ValueError(f"cell must be at least 12 pixels, got {cell}")
    side = (n + 1) * cell
    img = np.full((side, side, 3), 255, np.uint8)
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, cell / 90.0

    def text(s: str, r: int, c: int, colour: tuple[int, int, int]) -> None:
        (tw, th), _ = cv2.getTextSize(s, font, scale, 1)
        x = c * cell + (cell - tw) // 2
        y = r * cell + (cell + th) // 2
        cv2.putText(img, s, (x, y), font, scale, colour, 1, cv2.LINE_AA)

    img[:cell, :] = img[:, :cell] = (235, 235, 235)
    text("t\\p", 0, 0, (90, 90, 90))  # true classes down, predictions across
    for i in range(n):
        text(labels[i], i + 1, 0, (0, 0, 0))
        text(labels[i], 0, i + 1, (0, 0, 0))
        for j in range(n):
            y0, x0 = (i + 1) * cell, (j + 1) * cell
            img[y0:y0 + cell, x0:x0 + cell] = _cell_colour(frac[i, j])
            text(str(int(m[i, j])), i + 1, j + 1, (255, 255, 255) if frac[i, j] > 0.5 else (0, 0, 0))
    for k in range(1, n + 1):
        img[k * cell, :] = img[:, k * cell] = (160, 160, 160)
    return img


@dataclass
class TileModel:
    estimator: Pipeline
    feature_config: FeatureConfig
    kind: str
    frame_rule: str = "mean"
    model_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    version: int = 1
    created_at: float = field(default_factory=time.time)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.estimator.classes_]

    @classmethod
    def train(cls, X: np.ndarray, y: np.ndarray, cfg: FeatureConfig, kind: str = "svm", frame_rule: str = "mean", **kw) -> "TileModel":
        est = make_estimator(kind, **kw)
        est.fit(X, np.asarray(y).astype(str))
        return cls(est, cfg, kind, frame_rule)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.estimator.predict_proba(np.asarray(X, dtype=np.float32))

    def frame_probabilities(self, tile_probs: np.ndarray) -> np.ndarray:
        mean = tile_probs.mean(axis=0)
        if self.frame_rule == "mean":
            return mean
        if self.frame_rule.startswith("any:"):
            k = self.classes.index(self.frame_rule[4:])
            p_any = 1.0 - np.prod(1.0 - tile_probs[:, k])
            rest = np.delete(mean, k)
            rest = rest / rest.sum() * (1.0 - p_any) if rest.sum() > 0 else rest
            return np.insert(rest, k, p_any)
        raise ValueError(f"unknown frame rule {self.frame_rule!r}")

    def meta(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "version": self.version,
            "created_at": self.created_at,
            "kind": self.kind,
            "frame_rule": self.frame_rule,
            "classes": self.classes,
            "feature_config": self.feature_config.as_dict(),
            "feature_digest": self.feature_config.digest(),
            "metrics": self.metrics,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``<path>`` (skops estimator) and ``<path>.json`` (metadata).

        When the metrics hold a ``confusion_matrix`` (``{"labels", "matrix"}``), its
        :func:`confusion_png` is written next to them as ``<path>.confusion.png``.
        """
        import skops.io as sio

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sio.dump(self.estimator, path)
        Path(str(path) + ".json").write_text(json.dumps(self.meta(), indent=2))
        cm = self.metrics.get("confusion_matrix")
        if isinstance(cm, dict) and "matrix" in cm and "labels" in cm:
            import cv2

            png = Path(str(path) + ".confusion.png")
            if not cv2.imwrite(str(png), confusion_png(cm["matrix"], cm["labels"])):
                raise OSError(f"cannot write {png}")
        return path

    @classmethod
    def load(cls, path: str | Path, expected_digest: str | None = None) -> "TileModel":
        import skops.io as sio

        path = Path(path)
        meta = json.loads(Path(str(path) + ".json").read_text())
        cfg = FeatureConfig.from_dict(meta["feature_config"])
        if cfg.digest() != meta["feature_digest"]:
            raise ModelMismatch(f"{path}: metadata is inconsistent (feature digest does not match its configuration)")
        if expected_digest is not None and meta["feature_digest"] != expected_digest:
            raise ModelMismatch(
                f"{path} was trained on features {meta['feature_digest']} but the processor computes {expected_digest}: "
                "retrain with the processor's [features] configuration"
            )
        untrusted = sio.get_untrusted_types(file=path)
        allowed = [t for t in untrusted if t.startswith(("sklearn.", "numpy."))]
        refused = sorted(set(untrusted) - set(allowed))
        if refused:
            raise ModelMismatch(f"{path} contains types outside scikit-learn/numpy, refusing to load: {refused}")
        est = sio.load(path, trusted=allowed)
        return cls(est, cfg, meta["kind"], meta["frame_rule"], meta["model_id"], meta["version"], meta["created_at"], meta["metrics"])
