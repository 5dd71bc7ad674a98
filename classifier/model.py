"""The tile model: a scikit-learn estimator plus what it needs to be served safely.

Saved with skops (no plain pickle). The artifact records the feature configuration and its
digest, and loading refuses a model whose digest differs from the processor's.

Loading is by explicit allow-list (:func:`audit_skops`), never by "anything from sklearn or
numpy": skops 0.16 trusts *by default* every scikit-learn estimator (FunctionTransformer and
DummyClassifier included) and every numpy ufunc, and resolves a function as
``getattr(import_module(module), name)``, so a function an sklearn module merely re-exports
passes a module-prefix check — a Pipeline of FunctionTransformers built from such gadgets ran
a shell command at its first ``predict_proba``. Passing ``trusted=`` to skops cannot narrow its
defaults (it adds to them), so before skops builds anything the raw ``schema.json`` of the
file is walked here and every node must be one of :data:`ALLOWED_NODES` — exactly the
(skops loader, type) pairs that :func:`make_estimator`'s pipelines consist of, no function,
partial, method, reduce or object-array node. Then skops loads with ``trusted=`` that list,
and the loaded object must have the shape :func:`make_estimator` gives it
(:func:`check_estimator`): ``Pipeline([StandardScaler,] CalibratedClassifierCV(SVC) |
LogisticRegression)`` with consistent array shapes, ``classes_`` equal to the metadata's, the
processor's feature length, and a ``predict_proba`` that answers a probe. Every refusal is a
:class:`ModelRefused` with a reason code.

Frame aggregation (``frame_rule``):

* ``"mean"``: P(c | frame) = mean over tiles of P(c | tile).
* ``"any:<class>"``: noisy-OR for one class — P(c | frame) = 1 - prod(1 - P(c | tile)),
  the other classes share the rest in proportion to their mean tile probability.
"""

from __future__ import annotations

import json
import re
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
from tilestream.errors import Refused

KINDS = ("svm", "logistic")


class ModelRefused(Refused, ValueError):
    """A model that is not loaded or published. ``reason`` is a short code:

    ``unsigned`` (a TSM1 record), ``malformed``, ``too_large``, ``unknown_key``, ``bad_signature``,
    ``wrong_name``, ``untrusted_type`` (a type outside :data:`ALLOWED_NODES`), ``wrong_type`` (not
    the shape :func:`make_estimator` builds, or a failing probe), ``feature_mismatch``.
    """



class ModelMismatch(ModelRefused):
    """The model was trained on other features than the processor computes."""

    def __init__(self, message: str, reason: str = "feature_mismatch"):
        super().__init__(reason, message)


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
        """A model file ``<path>`` (skops) with its ``<path>.json`` metadata, through every check of
        :meth:`from_bytes`."""
        path = Path(path)
        meta_path = Path(str(path) + ".json")
        for f, limit in ((meta_path, MAX_META_BYTES), (path, MAX_SKOPS_BYTES)):
            if f.stat().st_size > limit:
                raise ModelRefused("too_large", f"{f} is larger than {limit} bytes")
        try:
            return cls.from_bytes(path.read_bytes(), parse_meta(meta_path.read_bytes()), expected_digest)
        except ModelRefused as exc:
            raise type(exc)(*_refusal_args(exc, f"{path}: {exc}")) from None

    @classmethod
    def from_bytes(cls, data: bytes, meta: dict[str, Any], expected_digest: str | None = None) -> "TileModel":
        """Load skops bytes ``data`` described by ``meta`` (see :func:`parse_meta`).

        Order: metadata and feature digest, then the allow-list audit of the file, then skops
        with ``trusted=`` the allow-list, then :func:`check_estimator` on the result.
        """
        import skops.io as sio

        meta = validate_meta(meta)
        try:
            cfg = FeatureConfig.from_dict(meta["feature_config"])
            digest = cfg.digest()
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelRefused("malformed", f"feature configuration of the model does not parse: {exc}") from None
        if digest != meta["feature_digest"]:
            raise ModelMismatch("metadata is inconsistent (feature digest does not match its configuration)")
        if expected_digest is not None and meta["feature_digest"] != expected_digest:
            raise ModelMismatch(
                f"the model was trained on features {meta['feature_digest']} but the processor computes {expected_digest}: "
                "retrain with the processor's [features] configuration"
            )
        audit_skops(data)
        trusted = sorted(ALLOWED_TYPES)
        try:
            untrusted = set(sio.get_untrusted_types(data=data)) - ALLOWED_TYPES
            if untrusted:  # cannot happen after audit_skops; kept as skops' own word on the file
                raise ModelRefused("untrusted_type", f"types outside the allow-list: {sorted(untrusted)[:10]}")
            est = sio.loads(data, trusted=trusted)
        except ModelRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever skops says about a bad file is a refusal
            raise ModelRefused("malformed", f"skops cannot load the model: {type(exc).__name__}: {exc}"[:500]) from None
        check_estimator(est, meta["classes"], cfg)
        return cls(est, cfg, meta["kind"], meta["frame_rule"], meta["model_id"], meta["version"], meta["created_at"],
                   meta["metrics"])


def _refusal_args(exc: ModelRefused, message: str) -> tuple:
    return (message, exc.reason) if isinstance(exc, ModelMismatch) else (exc.reason, message)


# -- what a model file may contain ------------------------------------------------------------
MAX_META_BYTES = 64 * 1024
MAX_SKOPS_BYTES = 64 * 1024 * 1024  # the models topic's max.message.bytes
MAX_UNZIPPED_BYTES = 256 * 1024 * 1024  # a trained SVC of the scene model: ~2 MB; bounds a zip bomb
MAX_ZIP_ENTRIES = 10_000
MAX_SCHEMA_DEPTH = 64  # make_estimator's pipelines nest 23 deep
MAX_SCHEMA_NODES = 500_000


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__name__}"


def _estimator_types() -> dict[str, type]:
    from sklearn.calibration import _CalibratedClassifier, _SigmoidCalibration

    return {_type_name(t): t for t in (Pipeline, StandardScaler, SVC, CalibratedClassifierCV, _CalibratedClassifier,
                                       _SigmoidCalibration, LogisticRegression)}


# (skops loader -> types) a tile model may hold: what the schema.json of make_estimator's svm and
# logistic pipelines, with and without the scaler, consists of under scikit-learn 1.9 / skops 0.16
# (numpy scalar types besides float64 for other numpy versions). JsonNode is skops' JSON literal
# (always recorded as builtins.str); TypeNode here is only a dict's key type; NdArrayNode arrays must
# be numpy's own format (np.load without pickle), not object arrays.
ALLOWED_NODES: dict[str, frozenset[str]] = {
    "ObjectNode": frozenset(_estimator_types()),
    "DictNode": frozenset({"builtins.dict"}),
    "ListNode": frozenset({"builtins.list"}),
    "TupleNode": frozenset({"builtins.tuple"}),
    "JsonNode": frozenset({"builtins.str"}),
    "TypeNode": frozenset({"builtins.str", "builtins.int"}),
    "NdArrayNode": frozenset({"numpy.ndarray", "numpy.float64", "numpy.float32", "numpy.int64", "numpy.int32",
                              "numpy.bool", "numpy.str_"}),
}
ALLOWED_TYPES: frozenset[str] = frozenset().union(*ALLOWED_NODES.values())


def audit_skops(data: bytes) -> None:
    """Refuse a skops file holding anything but :data:`ALLOWED_NODES`, before skops parses it.

    Reads only the zip directory and ``schema.json`` (sizes bounded first: the zip module stops
    at an entry's declared size), then walks every dict and list of the schema iteratively —
    a superset of what skops turns into nodes — so no function, partial, method, reduce,
    operator or object-array node, and no type outside the list, reaches skops.
    """
    import io
    import zipfile

    if len(data) > MAX_SKOPS_BYTES:
        raise ModelRefused("too_large", f"model file of {len(data)} bytes exceeds {MAX_SKOPS_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_ENTRIES or sum(i.file_size for i in infos) > MAX_UNZIPPED_BYTES:
                raise ModelRefused("too_large", f"model file unpacks to more than {MAX_UNZIPPED_BYTES} bytes "
                                                f"or {MAX_ZIP_ENTRIES} entries")
            schema = json.loads(zf.read("schema.json"))
    except ModelRefused:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, RecursionError, OSError, EOFError, NotImplementedError) as exc:
        raise ModelRefused("malformed", f"not a skops file: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(schema, dict):
        raise ModelRefused("malformed", "skops schema is not an object")
    refused: set[str] = set()
    stack: list[tuple[Any, int]] = [(schema, 0)]
    nodes = 0
    while stack:
        obj, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH or nodes > MAX_SCHEMA_NODES:
            raise ModelRefused("malformed", f"skops schema nests deeper than {MAX_SCHEMA_DEPTH} "
                                            f"or has more than {MAX_SCHEMA_NODES} values")
        if isinstance(obj, dict):
            if "__loader__" in obj:
                loader, mod, name = obj.get("__loader__"), obj.get("__module__"), obj.get("__class__")
                typename = f"{mod}.{name}" if isinstance(mod, str) and isinstance(name, str) else repr((mod, name))[:100]
                allowed = ALLOWED_NODES.get(loader) if isinstance(loader, str) else None
                if loader == "CachedNode":  # a second reference to an object already in the file (audited there)
                    allowed = ALLOWED_TYPES
                if allowed is None or typename not in allowed:
                    refused.add(f"{str(loader)[:40]}:{typename}")
                elif loader == "NdArrayNode" and obj.get("type") != "numpy":
                    refused.add(f"NdArrayNode:{typename} (object array)")
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)
    if refused:
        raise ModelRefused("untrusted_type", f"model holds types outside the allow-list: {sorted(refused)[:10]}")


def _array(a: Any, ndim: int, dtype: Any = None) -> np.ndarray:
    if type(a) is not np.ndarray or a.ndim != ndim or (dtype is not None and a.dtype != dtype):
        raise ModelRefused("wrong_type", f"expected a {ndim}-d {dtype or ''} array, got {type(a).__name__} "
                                         f"{getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ModelRefused("wrong_type", "model arrays hold NaN or infinity")
    return a


def _check_svc(svc: Any, n_features: int) -> None:
    """The libsvm arrays of a fitted RBF SVC agree with each other: libsvm indexes them unchecked."""
    d = vars(svc)
    if svc.kernel != "rbf" or d.get("_impl", "c_svc") != "c_svc" or d.get("_sparse") is not False:
        raise ModelRefused("wrong_type", "the SVC is not a dense RBF C-SVC")
    sv = _array(d.get("support_vectors_"), 2, np.float64)
    n_support = _array(d.get("_n_support"), 1, np.int32)
    support = _array(d.get("support_"), 1, np.int32)
    classes = _array(d.get("classes_"), 1)
    dual = _array(d.get("_dual_coef_"), 2, np.float64)
    intercept = _array(d.get("_intercept_"), 1, np.float64)
    k, n_sv = len(classes), sv.shape[0]
    if (k < 2 or sv.shape[1] != n_features or len(n_support) != k or (n_support < 0).any()
            or int(n_support.sum()) != n_sv or len(support) != n_sv or dual.shape != (k - 1, n_sv)
            or intercept.shape != (k * (k - 1) // 2,) or not sv.flags.c_contiguous or not dual.flags.c_contiguous):
        raise ModelRefused("wrong_type", "the SVC's support vectors, coefficients and class counts do not agree")
    gamma = d.get("_gamma")
    if not isinstance(gamma, float) or not np.isfinite(gamma) or gamma <= 0:
        raise ModelRefused("wrong_type", f"the SVC's gamma {gamma!r} is not a positive number")


def check_estimator(est: Any, classes: list[str], cfg: FeatureConfig) -> None:
    """The loaded object is what :func:`make_estimator` builds, fitted for ``classes`` on ``cfg``'s
    features: exact types (no subclass), consistent shapes, and a probe ``predict_proba`` on two
    zero vectors that returns finite probabilities for the right classes."""
    from sklearn.calibration import _CalibratedClassifier, _SigmoidCalibration

    from stream_processor.features import feature_length

    try:
        n = int(feature_length(cfg))
    except Exception as exc:  # noqa: BLE001 - a feature configuration that does not compute is malformed
        raise ModelRefused("malformed", f"the model's feature configuration has no feature length: {exc}"[:300]) from None
    if not 0 < n <= 1_000_000:
        raise ModelRefused("malformed", f"the model's feature configuration gives {n} features per tile")
    if type(est) is not Pipeline or not isinstance(est.steps, list) or not 1 <= len(est.steps) <= 2 \
            or getattr(est, "memory", None) is not None:
        raise ModelRefused("wrong_type", f"the model is a {_type_name(type(est))}, not a Pipeline of 1 or 2 steps")
    for step in est.steps:
        if not (isinstance(step, tuple) and len(step) == 2 and isinstance(step[0], str)):
            raise ModelRefused("wrong_type", "a pipeline step is not a (name, estimator) pair")
    *pre, (_, final) = est.steps
    if pre:
        scaler = pre[0][1]
        if type(scaler) is not StandardScaler:
            raise ModelRefused("wrong_type", f"the first step is a {_type_name(type(scaler))}, not a StandardScaler")
        for attr in ("mean_", "scale_"):
            if getattr(scaler, attr, None) is not None and _array(getattr(scaler, attr), 1).shape != (n,):
                raise ModelRefused("wrong_type", f"the scaler's {attr} does not have {n} features")
    if type(final) is LogisticRegression:
        coef, intercept = _array(getattr(final, "coef_", None), 2), _array(getattr(final, "intercept_", None), 1)
        if coef.shape[1] != n or coef.shape[0] not in (1, len(classes)) or intercept.shape != (coef.shape[0],):
            raise ModelRefused("wrong_type", "the logistic regression's coefficients do not fit its classes and features")
    elif type(final) is CalibratedClassifierCV:
        cals = getattr(final, "calibrated_classifiers_", None)
        if final.method != "sigmoid" or not isinstance(cals, list) or not 1 <= len(cals) <= 20:
            raise ModelRefused("wrong_type", "the calibrated classifier is not 1..20 sigmoid-calibrated SVCs")
        for c in cals:
            if type(c) is not _CalibratedClassifier or type(c.estimator) is not SVC or c.method != "sigmoid" \
                    or not isinstance(c.calibrators, list) or len(c.calibrators) not in (1, len(classes)) \
                    or any(type(s) is not _SigmoidCalibration for s in c.calibrators):
                raise ModelRefused("wrong_type", "a calibrated classifier is not an SVC with sigmoid calibrators")
            _check_svc(c.estimator, n)
    else:
        raise ModelRefused("wrong_type", f"the final step is a {_type_name(type(final))}, "
                                         "not CalibratedClassifierCV(SVC) or LogisticRegression")
    try:
        own = [str(c) for c in _array(est.classes_, 1)]
        probe = est.predict_proba(np.zeros((2, n), dtype=np.float32))
    except ModelRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot answer is refused, whatever the error
        raise ModelRefused("wrong_type", f"the model does not answer predict_proba: {type(exc).__name__}: {exc}"[:300]) from None
    if own != list(classes):
        raise ModelRefused("wrong_type", f"the model's classes {own[:20]} differ from its metadata's {list(classes)[:20]}")
    if not (isinstance(probe, np.ndarray) and probe.shape == (2, len(classes)) and np.isfinite(probe).all()
            and np.allclose(probe.sum(axis=1), 1.0, atol=1e-3)):
        raise ModelRefused("wrong_type", "the model's predict_proba does not return one probability per class")


_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def parse_meta(blob: bytes) -> dict[str, Any]:
    """Model metadata JSON, size- and depth-bounded, then :func:`validate_meta`."""
    if len(blob) > MAX_META_BYTES:
        raise ModelRefused("too_large", f"model metadata of {len(blob)} bytes exceeds {MAX_META_BYTES}")
    depth = deepest = 0
    in_str = esc = False
    for ch in blob:  # the JSON nesting depth, strings skipped: json.loads recurses per level
        if in_str:
            esc, in_str = (False, True) if esc else (ch == 0x5C, ch != 0x22)
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif ch in (0x5D, 0x7D):
            depth -= 1
    if deepest > 16:
        raise ModelRefused("malformed", "model metadata nests deeper than 16 levels")
    try:
        meta = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        raise ModelRefused("malformed", f"model metadata is not JSON: {exc}"[:200]) from None
    return validate_meta(meta)


def validate_meta(meta: Any) -> dict[str, Any]:
    """The fields :meth:`TileModel.from_bytes` uses, each of the right type and bounded."""
    def bad(what: str):
        return ModelRefused("malformed", f"model metadata: {what}")

    if not isinstance(meta, dict):
        raise bad("not an object")
    for key, types in (("model_id", str), ("version", int), ("created_at", (int, float)), ("kind", str),
                       ("frame_rule", str), ("classes", list), ("feature_config", dict), ("feature_digest", str),
                       ("metrics", dict)):
        if not isinstance(meta.get(key), types) or isinstance(meta.get(key), bool):
            raise bad(f"{key} is missing or not a {getattr(types, '__name__', 'number')}")
    if not _ID.fullmatch(meta["model_id"]) or not _ID.fullmatch(meta["feature_digest"]):
        raise bad("model_id or feature_digest is not 1..64 characters of [A-Za-z0-9_.:-]")
    if not 0 <= meta["version"] < 2**53 or meta["kind"] not in KINDS:
        raise bad(f"version out of range or kind not one of {KINDS}")
    classes = meta["classes"]
    if not 2 <= len(classes) <= 1000 or not all(isinstance(c, str) and 0 < len(c) <= 128 for c in classes) \
            or len(set(classes)) != len(classes):
        raise bad("classes are not 2..1000 distinct strings of 1..128 characters")
    rule = meta["frame_rule"]
    if not (rule == "mean" or (rule.startswith("any:") and rule[4:] in classes)):
        raise bad(f"frame_rule {rule[:80]!r} is not 'mean' or 'any:<one of the classes>'")
    if "name" in meta and not (isinstance(meta["name"], str) and _ID.fullmatch(meta["name"])):
        raise bad("name is not 1..64 characters of [A-Za-z0-9_.:-]")
    return meta
