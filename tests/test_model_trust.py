"""Models are authenticated and loaded by allow-list: what an attacker can write to ``models`` or
hand over as a model file is refused before it is parsed or run, and the running model stays.

The gadget is a live one: a Pipeline whose FunctionTransformer calls a function an sklearn
package re-exports (``sklearn.datasets.dump_svmlight_file``, which writes a file named in the
transformer's ``kw_args``). The control test shows that the former check (any type whose module
starts with ``sklearn.``/``numpy.``) lets it write its marker at the first ``predict_proba``.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from classifier import registry
from classifier.model import ModelRefused, TileModel, audit_skops
from classifier.service import ClassifierService
from classifier.stage import FrameClassifier
from tilestream.metrics import Metrics
from stream_processor.features import feature_length
from tilestream import topics
from tilestream.config import FeatureConfig
from tilestream.keys import KeyStore
from tilestream.records import DeadLetter

from conftest import child_env, read_topic, wait_for

CFG = FeatureConfig()
N = feature_length(CFG)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(90, N)).astype(np.float32)
    y = np.array(["background", "person", "car"] * 30)
    X[y == "person", :8] += 2.0
    X[y == "car", 8:16] += 2.0
    return X, y


def _good(tmp: Path, kind: str = "logistic", name: str = "good") -> tuple[Path, TileModel]:
    X, y = _data()
    model = TileModel.train(X, y, CFG, kind=kind, **({"calibration_folds": 3} if kind == "svm" else {}))
    return model.save(tmp / f"{name}.skops"), model


def _write_model(tmp: Path, name: str, skops_bytes: bytes, meta: dict) -> Path:
    path = tmp / f"{name}.skops"
    path.write_bytes(skops_bytes)
    Path(str(path) + ".json").write_text(json.dumps(meta))
    return path


def _rewrite_schema(data: bytes, edit) -> bytes:
    """The skops zip with ``edit(schema)`` applied to its schema.json."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename == "schema.json":
                schema = json.loads(body)
                edit(schema)
                body = json.dumps(schema).encode()
            dst.writestr(info, body)
    return out.getvalue()


def _nodes(schema, loader: str):
    stack = [schema]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if o.get("__loader__") == loader:
                yield o
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def _gadget(tmp: Path, marker: Path, good_meta: dict) -> Path:
    """A pipeline FunctionTransformer(dump_svmlight_file -> marker) -> LogisticRegression, its
    function recorded under the re-exporting package ``sklearn.datasets``, with a good model's meta."""
    import skops.io as sio
    from sklearn.datasets import dump_svmlight_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    X, y = _data()
    est = make_pipeline(FunctionTransformer(dump_svmlight_file, kw_args={"y": np.zeros(len(X)), "f": str(tmp / "fit.txt")},
                                            validate=False, check_inverse=False),
                        LogisticRegression(max_iter=500))
    est.steps[0] = (est.steps[0][0], FunctionTransformer(np.asarray, validate=False))  # fit without the gadget
    est.fit(X, y)
    est.steps[0] = (est.steps[0][0], FunctionTransformer(dump_svmlight_file, kw_args={"y": np.zeros(2), "f": str(marker)},
                                                         validate=False, check_inverse=False))
    est.steps[0][1].fit(X[:2])

    def reexport(schema):
        for node in _nodes(schema, "FunctionNode"):
            node["__module__"] = "sklearn.datasets"

    data = _rewrite_schema(sio.dumps(est), reexport)
    return _write_model(tmp, "gadget", data, dict(good_meta, model_id="gadget000001"))


@pytest.fixture
def good(tmp_path):
    return _good(tmp_path)


def _record(path: Path, keystore: KeyStore, version: int = 1, name: str = "default") -> bytes:
    kid, key = keystore.model_release_private_key()
    return registry.pack(path, version, name, kid, key)


def _unsigned_tsm1(path: Path, version: int) -> bytes:
    """A record in the former, unsigned format (what `models publish` wrote before TSM2)."""
    meta = json.loads(Path(str(path) + ".json").read_text())
    meta["version"] = version
    blob = json.dumps(meta).encode()
    return b"TSM1" + struct.pack(">I", len(blob)) + blob + path.read_bytes()


class LoadSpy:
    """Counts what reaches TileModel.from_bytes (the only way to skops) and delegates to it."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = TileModel.from_bytes.__func__

        def spy(cls, *a, **kw):
            self.calls += 1
            return real(cls, *a, **kw)

        monkeypatch.setattr(TileModel, "from_bytes", classmethod(spy))


# -- the gadget ---------------------------------------------------------------------------------
def test_the_gadget_is_live_under_the_former_prefix_check(tmp_path, good):
    import skops.io as sio

    marker = tmp_path / "pwned"
    path = _gadget(tmp_path, marker, good[1].meta())
    data = path.read_bytes()
    untrusted = sio.get_untrusted_types(data=data)
    assert untrusted == ["sklearn.datasets.dump_svmlight_file"]  # FunctionTransformer itself is trusted by skops
    former = sio.loads(data, trusted=[t for t in untrusted if t.startswith(("sklearn.", "numpy."))])
    with pytest.raises(Exception):
        former.predict_proba(np.zeros((2, N), np.float32))
    assert marker.exists(), "control: the gadget ran its function at predict_proba"


def test_a_gadget_model_file_is_refused_before_skops_builds_it(tmp_path, good):
    marker = tmp_path / "pwned"
    path = _gadget(tmp_path, marker, good[1].meta())
    with pytest.raises(ModelRefused) as e:
        TileModel.load(path, CFG.digest())
    assert e.value.reason == "untrusted_type"
    assert "FunctionTransformer" in str(e.value) and "dump_svmlight_file" in str(e.value)
    assert not marker.exists()


def test_a_gadget_signed_by_the_release_key_is_still_refused(tmp_path, keystore, good):
    marker = tmp_path / "pwned"
    path = _gadget(tmp_path, marker, good[1].meta())
    kid, key = keystore.model_release_private_key()
    record = registry.sign_record(dict(good[1].meta(), model_id="gadget000001", name="default", version=2),
                                  path.read_bytes(), kid, key)
    with pytest.raises(ModelRefused) as e:
        registry.unpack(record, CFG.digest(), keystore.model_release_public_keys(), "default")
    assert e.value.reason == "untrusted_type"
    assert not marker.exists()


def test_a_constant_dummy_classifier_with_a_copied_model_id_is_refused(tmp_path, keystore, good):
    import skops.io as sio
    from sklearn.dummy import DummyClassifier
    from sklearn.pipeline import make_pipeline

    X, y = _data()
    dummy = make_pipeline(DummyClassifier(strategy="constant", constant="background")).fit(X, y)
    path = _write_model(tmp_path, "dummy", sio.dumps(dummy), good[1].meta())
    with pytest.raises(ModelRefused) as e:
        TileModel.load(path, CFG.digest())
    assert e.value.reason == "untrusted_type" and "DummyClassifier" in str(e.value)
    with pytest.raises(ModelRefused) as e:
        registry.unpack(_record(path, keystore), CFG.digest(), keystore.model_release_public_keys())
    assert e.value.reason == "untrusted_type"


def test_allowed_types_in_the_wrong_shape_are_refused(tmp_path, good):
    import skops.io as sio
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    X, y = _data()
    meta = good[1].meta()
    bare_svc = make_pipeline(StandardScaler(), SVC()).fit(X, y)  # no predict_proba
    with pytest.raises(ModelRefused, match="final step") as e:
        TileModel.load(_write_model(tmp_path, "svc", sio.dumps(bare_svc), meta), CFG.digest())
    assert e.value.reason == "wrong_type"

    svm_path, svm = _good(tmp_path, "svm", "svm")

    data = svm_path.read_bytes()
    src = zipfile.ZipFile(io.BytesIO(data))
    schema = json.loads(src.read("schema.json"))
    n_support_files = [node["content"]["content"]["_n_support"]["file"] for node in _nodes(schema, "ObjectNode")
                       if node["__class__"] == "SVC" and "_n_support" in node["content"]["content"]]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename in n_support_files:  # libsvm would index past the support vectors
                buf = io.BytesIO()
                np.save(buf, (np.load(io.BytesIO(body)) * 3).astype(np.int32))
                body = buf.getvalue()
            dst.writestr(info, body)
    assert n_support_files
    with pytest.raises(ModelRefused, match="do not agree") as e:
        TileModel.load(_write_model(tmp_path, "svm-bad", out.getvalue(), svm.meta()), CFG.digest())
    assert e.value.reason == "wrong_type"

    other_classes = dict(meta, classes=["a", "b", "c"], frame_rule="mean")
    with pytest.raises(ModelRefused, match="classes") as e:
        TileModel.load(_write_model(tmp_path, "classes", good[0].read_bytes(), other_classes), CFG.digest())
    assert e.value.reason == "wrong_type"


def test_hostile_skops_structure_is_refused_by_the_audit(good):
    data = good[0].read_bytes()

    def deep(schema):
        v = schema["content"]
        for _ in range(100):
            v = {"x": v}
        schema["content"] = v

    with pytest.raises(ModelRefused, match="deeper") as e:
        audit_skops(_rewrite_schema(data, deep))
    assert e.value.reason == "malformed"
    with pytest.raises(ModelRefused) as e:
        audit_skops(b"PK\x03\x04 not a zip")
    assert e.value.reason == "malformed"

    def object_array(schema):
        node = next(_nodes(schema, "NdArrayNode"))
        node["type"] = "json"

    with pytest.raises(ModelRefused, match="object array") as e:
        audit_skops(_rewrite_schema(data, object_array))
    assert e.value.reason == "untrusted_type"


# -- the record ---------------------------------------------------------------------------------
def test_a_signed_record_loads_and_classifies(tmp_path, keystore, good):
    path, model = good
    record = _record(path, keystore, version=4)
    loaded = registry.unpack(record, CFG.digest(), keystore.model_release_keys(), "default")
    assert (loaded.model_id, loaded.version, loaded.classes) == (model.model_id, 4, model.classes)
    X, _ = _data(seed=1)
    np.testing.assert_allclose(loaded.predict_proba(X), model.predict_proba(X), rtol=1e-6)


def test_unsigned_unknown_key_and_tampered_records_are_refused_before_parsing(tmp_path, keystore, good, monkeypatch):
    path, _ = good
    record = _record(path, keystore)
    stranger = KeyStore(tmp_path / "stranger")
    stranger.init_model_release()
    skops_at = len(record) - len(path.read_bytes())
    tampered = bytearray(record)
    tampered[skops_at + len(path.read_bytes()) // 2] ^= 0x01
    meta_tampered = record.replace(b'"version":1', b'"version":9')
    assert meta_tampered != record
    spy = LoadSpy(monkeypatch)
    keys = keystore.model_release_public_keys()
    for data, reason in [(_unsigned_tsm1(path, 1), "unsigned"),
                         (_record(path, stranger), "unknown_key"),
                         (bytes(tampered), "bad_signature"),
                         (meta_tampered, "bad_signature"),
                         (b"TSM2" + b"\xff\xff\xff\xff", "malformed"),
                         (b"XXXX" + record[4:], "malformed"),
                         (record[:60], "malformed")]:
        with pytest.raises(ModelRefused) as e:
            registry.unpack(data, CFG.digest(), keys)
        assert e.value.reason == reason, (reason, str(e.value))
    assert spy.calls == 0, "no refused record reached the skops side"
    registry.unpack(record, CFG.digest(), keys)
    assert spy.calls == 1


def test_record_bounds(tmp_path, keystore, good):
    path, model = good
    kid, key = keystore.model_release_private_key()
    keys = keystore.model_release_public_keys()
    huge_meta = dict(model.meta(), name="default", metrics={"pad": "x" * (70 * 1024)})
    with pytest.raises(ModelRefused) as e:
        registry.sign_record(huge_meta, path.read_bytes(), kid, key)
    assert e.value.reason == "too_large"
    record = _record(path, keystore)
    (m,) = struct.unpack_from(">I", record, 4)
    long_header = record[:8 + m] + struct.pack(">I", 100_000) + record[8 + m + 4:]
    with pytest.raises(ModelRefused, match="signature header") as e:
        registry.unpack(long_header, None, keys)
    deep = {"a": 1}
    for _ in range(40):
        deep = {"a": deep}
    nested = registry.sign_record(dict(model.meta(), name="default", version=1, metrics=deep), path.read_bytes(), kid, key)
    with pytest.raises(ModelRefused, match="nests") as e:
        registry.unpack(nested, None, keys)
    assert e.value.reason == "malformed"
    with pytest.raises(ModelRefused) as e:
        registry.parse_record(b"TSM2" + b"\0" * (topics.MAX_MODEL_BYTES + 1))
    assert e.value.reason == "too_large"


def test_release_key_rotation_and_untrust(tmp_path, keystore, good):
    path, _ = good
    old = _record(path, keystore)
    keys = keystore.model_release_keys(check_every_s=0)
    old_kid = keystore.init_model_release()
    new_kid = keystore.rotate_model_release()
    assert new_kid != old_kid and len(new_kid) == 16
    assert (keystore.path / "release" / f"{new_kid}.key").stat().st_mode & 0o777 == 0o600
    new = _record(path, keystore)
    registry.unpack(old, None, keys)  # older release keys stay trusted until untrusted
    registry.unpack(new, None, keys)
    with pytest.raises(ValueError, match="current"):
        keystore.untrust_model_release(new_kid)
    keystore.untrust_model_release(old_kid)
    with pytest.raises(ModelRefused) as e:
        registry.unpack(old, None, keys)
    assert e.value.reason == "unknown_key"
    registry.unpack(new, None, keys)
    classifier_side = KeyStore(tmp_path / "classifier-keys")  # public keys only
    assert classifier_side.trust_model_release(keystore.path / "release" / f"{new_kid}.pub") == new_kid
    registry.unpack(new, None, classifier_side.model_release_public_keys())
    with pytest.raises(FileNotFoundError, match="init-release"):
        classifier_side.model_release_private_key()


# -- on the real broker --------------------------------------------------------------------------
def _send(bootstrap: str, name: str, value: bytes) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=len(value) + 64 * 1024)
    try:
        p.send(topics.MODELS, key=name.encode(), value=value).get(timeout=60)
    finally:
        p.close()


@pytest.mark.kafka
def test_a_running_classifier_refuses_bad_model_records_and_keeps_its_model(kafka, keystore, tmp_path, good):
    bootstrap, name = kafka.bootstrap, "trust"
    path, first = good
    assert registry.publish(bootstrap, path, name, CFG.digest(), keystore=keystore) == 1
    watcher = registry.ModelWatcher(bootstrap, name, CFG.digest(), keys=keystore.model_release_keys())
    model = watcher.poll()
    assert (model.model_id, model.version) == (first.model_id, 1)
    from tilestream.stagekeys import StageKeys

    svc = ClassifierService(bootstrap, FrameClassifier(model, Metrics("tilestream_classifier"),
                                                       keys=StageKeys(keystore.path).for_classifier()), "trust-classifier",
                            metrics_interval_s=3600, models=watcher)
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    try:
        marker = tmp_path / "pwned"
        gadget = _gadget(tmp_path, marker, first.meta())
        stranger = KeyStore(tmp_path / "stranger")
        stranger.init_model_release()
        kid, key = keystore.model_release_private_key()
        bad = [
            _unsigned_tsm1(path, 99),                                # unsigned, claims a high version
            _record(path, stranger, version=100, name=name),         # signed by an unknown key
            registry.sign_record(dict(first.meta(), model_id="gadget000001", name=name, version=2),
                                 gadget.read_bytes(), kid, key),     # signed, but a gadget
        ]
        for value in bad:
            _send(bootstrap, name, value)
        wait_for(lambda: svc.metrics.counter("models_refused_total") >= 3, 60, "three refused model records")
        assert (svc.classifier.model.model_id, svc.classifier.model.version) == (first.model_id, 1), "the running model stays"
        assert not marker.exists()
        letters = wait_for(lambda: [DeadLetter.from_json(m.value) for m in read_topic(bootstrap, topics.DEAD_LETTERS)
                                    if DeadLetter.from_json(m.value).reason == "model_refused"] or None,
                           60, "model_refused dead letters")
        reasons = sorted(letter.message.split(":")[0] for letter in letters)
        assert reasons == ["unknown_key", "unsigned", "untrusted_type"], reasons
        assert all(letter.source_topic == topics.MODELS and len(letter.original) <= 4096 for letter in letters)

        second_path, second = _good(tmp_path, "svm", "second")
        # the forged versions 99 and 100 do not count; the signed gadget took version 2
        assert registry.publish(bootstrap, second_path, name, CFG.digest(), keystore=keystore) == 3
        wait_for(lambda: svc.classifier.model.version == 3, 60, "the classifier to swap to the good model")
        assert svc.classifier.model.model_id == second.model_id
        assert svc.metrics.counter("models_refused_total") == 3
    finally:
        svc.stop()
        runner.join(30)
    assert not runner.is_alive()


@pytest.mark.kafka
def test_models_publish_refuses_a_gadget_and_needs_the_release_key(kafka, keystore, tmp_path, good):
    env = child_env(kafka.bootstrap, keystore.path, tmp_path / "home")
    marker = tmp_path / "pwned"
    gadget = _gadget(tmp_path, marker, good[1].meta())
    out = subprocess.run([sys.executable, "-m", "tilestream_cli", "models", "publish", str(gadget), "--model-name", "cli"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "untrusted_type" not in out.stdout and "outside the allow-list" in out.stderr, out.stderr
    assert not marker.exists()
    bare = KeyStore(tmp_path / "no-release")
    bare.init_cloud()
    env_bare = child_env(kafka.bootstrap, bare.path, tmp_path / "home")
    out = subprocess.run([sys.executable, "-m", "tilestream_cli", "models", "publish", str(good[0]), "--model-name", "cli"],
                         env=env_bare, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "init-release" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "tilestream_cli", "models", "publish", str(good[0]), "--model-name", "cli"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "as version 1" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "tilestream_cli", "models", "show", "--model-name", "cli"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["model_id"] == good[1].model_id, out.stderr
