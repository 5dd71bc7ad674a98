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


def make_estimator(kind: str, C: float = 10.0, gamma: str | float = "scale") -> Pipeline:
    if kind == "svm":
        # Platt-calibrated probabilities (SVC(probability=True) is deprecated in scikit-learn 1.9).
        svc = SVC(kernel="rbf", C=C, gamma=gamma, random_state=0)
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", ensemble=False))
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    raise ValueError(f"unknown model kind {kind!r} ({', '.join(KINDS)})")


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
        """Write ``<path>`` (skops estimator) and ``<path>.json`` (metadata)."""
        import skops.io as sio

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sio.dump(self.estimator, path)
        Path(str(path) + ".json").write_text(json.dumps(self.meta(), indent=2))
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
