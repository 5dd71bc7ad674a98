"""Shared fixtures: a real Apache Kafka per version on free loopback ports, keys, sample data.

Brokers are started through the same code as ``tilestream kafka start`` (deploy/local_kafka.py),
with their state in pytest's tmp dir, and are always stopped — also when a test fails.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from deploy.local_kafka import DEFAULT_VERSION, LEGACY_VERSION, LocalKafka, free_port
from tilestream.config import KafkaSettings
from tilestream.keys import KeyStore
from tilestream.stagekeys import StageKeys
from tilestream.topics import pipeline_topics

class Brokers:
    """Real brokers on free loopback ports, one per version, stopped at teardown even on failure."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self.tmp = tmp_path_factory
        self.running: dict[str, LocalKafka] = {}

    def __call__(self, version: str = DEFAULT_VERSION) -> LocalKafka:
        if version not in self.running:
            lk = LocalKafka(version, "127.0.0.1", free_port(), free_port(),
                            state_dir=self.tmp.mktemp(f"kafka-{version}"), progress=lambda m: print(m))
            self.running[version] = lk  # registered before start: stopped even if start fails half-way
            lk.start(pipeline_topics(KafkaSettings()))
        return self.running[version]

    def stop(self) -> None:
        for lk in self.running.values():
            lk.stop()


@pytest.fixture(scope="module")
def kafka_any(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], LocalKafka]]:
    """Brokers of any supported version, private to the test module (isolated topics and groups)."""
    brokers = Brokers(tmp_path_factory)
    try:
        yield brokers
    finally:
        brokers.stop()


@pytest.fixture(scope="module")
def kafka(kafka_any) -> LocalKafka:
    """The default (4.x) broker of this test module."""
    return kafka_any(DEFAULT_VERSION)


SUPPORTED_VERSIONS = [DEFAULT_VERSION, LEGACY_VERSION]


@pytest.fixture
def keystore(tmp_path: Path) -> KeyStore:
    """Fresh keys for each test: the cloud, admin and tile-job keys, a model-release key, the stage key
    and the results-signing key (tilestream.stagekeys), and one enrolled camera, ``cam-test``, whose
    device bundle is in ``tmp_path/bundles`` (outside the key directory; where ``tilestream agent``
    looks by default with ``TILESTREAM_KEYS_DIR`` = ``keystore.path``)."""
    store = KeyStore(tmp_path / "keys")
    store.init()
    store.init_model_release()
    StageKeys(store.path).init()
    store.enroll("cam-test")
    return store


def mac_keys(store: KeyStore) -> dict:
    """The stage keys of a key directory (what ``TileBatch.from_wire`` verifies with)."""
    return StageKeys(store.path).stage_keys()


def result_keys(store: KeyStore) -> dict:
    """The results public keys of a key directory (what ``tail(..., keys=)`` verifies with)."""
    return StageKeys(store.path).results_public_keys()


@pytest.fixture(scope="session")
def vtest_path() -> Path:
    import sampledata as samples

    return samples.path("vtest.avi")


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def metric(port: int, name: str) -> float:
    """One unlabelled value from a service's Prometheus ``/metrics`` page (0 when absent)."""
    from tilestream.metrics import scrape

    value = scrape(port, name)
    if value is None:
        raise OSError(f"no /metrics on port {port}")
    return value


def child_env(bootstrap: str, keys_dir: Path, home: Path) -> dict[str, str]:
    return dict(os.environ, TILESTREAM_KAFKA_BOOTSTRAP=bootstrap, TILESTREAM_KEYS_DIR=str(keys_dir),
                TILESTREAM_HOME=str(home))


def read_topic(where, topic: str) -> list:
    """Every record of ``topic`` up to its end offsets now (``where``: a bootstrap string or a Connection)."""
    from kafkaio.clients import read_range

    return read_range(where, topic)


@pytest.fixture(scope="session")
def scene_model(tmp_path_factory, vtest_path) -> Path:
    """A small scene model trained inside the test session on the first 150 frames (logistic: fast)."""
    from classifier.train import train_scene_model
    from tilestream.config import FeatureConfig

    model = train_scene_model(str(vtest_path), FeatureConfig(), kind="logistic", max_frames=150, progress=print)
    return model.save(tmp_path_factory.mktemp("model") / "scene.skops")
