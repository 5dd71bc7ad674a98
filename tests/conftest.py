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
from tilestream.topics import pipeline_topics

_brokers: dict[str, LocalKafka] = {}


def _broker(version: str, tmp_path_factory: pytest.TempPathFactory) -> LocalKafka:
    if version not in _brokers:
        lk = LocalKafka(version, "127.0.0.1", free_port(), free_port(),
                        state_dir=tmp_path_factory.mktemp(f"kafka-{version}"), progress=lambda m: print(m))
        _brokers[version] = lk  # registered before start: stopped at session end even if start fails half-way
        lk.start(pipeline_topics(KafkaSettings()))
    return _brokers[version]


@pytest.fixture(scope="session", autouse=True)
def _stop_brokers() -> Iterator[None]:
    yield
    for lk in _brokers.values():
        lk.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> LocalKafka:
    """The default (4.x) broker."""
    return _broker(DEFAULT_VERSION, tmp_path_factory)


@pytest.fixture(scope="session")
def kafka_any(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], LocalKafka]:
    return lambda version: _broker(version, tmp_path_factory)


SUPPORTED_VERSIONS = [DEFAULT_VERSION, LEGACY_VERSION]


@pytest.fixture
def keystore(tmp_path: Path) -> KeyStore:
    """Fresh keys for each test: a cloud key pair and one enrolled camera, ``cam-test``."""
    store = KeyStore(tmp_path / "keys")
    store.init_cloud()
    store.enroll("cam-test")
    return store


@pytest.fixture(scope="session")
def vtest_path() -> Path:
    from tilestream import samples

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


def child_env(bootstrap: str, keys_dir: Path, home: Path) -> dict[str, str]:
    return dict(os.environ, TILESTREAM_KAFKA_BOOTSTRAP=bootstrap, TILESTREAM_KEYS_DIR=str(keys_dir),
                TILESTREAM_HOME=str(home))
