"""The model registry is a compacted Kafka topic: publishing a model switches running classifiers.

``models`` (one partition, compacted, key = model name) holds, per name, the newest published
model as one record: ``b"TSM1" | u32 meta length | meta JSON | skops bytes``. Publishing
assigns the next version number for that name. Every classifier reads the topic from the
start, follows it while it runs and swaps models between two poll batches — no restart, no
frame lost or answered twice, and every result names the model version that made it.

Loading goes through :meth:`TileModel.load`, so a published model gets the same checks as a
file: skops with scikit-learn/numpy types only, feature digest equal to the processor's.
"""

from __future__ import annotations

import json
import struct
import tempfile
import uuid
from pathlib import Path

from tilestream import topics

from classifier.model import TileModel

MAGIC = b"TSM1"
_LEN = struct.Struct(">I")


def pack(path: str | Path, version: int) -> bytes:
    path = Path(path)
    meta = json.loads(Path(str(path) + ".json").read_text())
    meta["version"] = version
    blob = json.dumps(meta).encode()
    return MAGIC + _LEN.pack(len(blob)) + blob + path.read_bytes()


def unpack(data: bytes, expected_digest: str | None) -> TileModel:
    if data[:4] != MAGIC:
        raise ValueError("not a tilestream model record")
    (n,) = _LEN.unpack_from(data, 4)
    meta, estimator = data[8:8 + n], data[8 + n:]
    with tempfile.TemporaryDirectory(prefix="tilestream-model-") as tmp:
        path = Path(tmp) / "model.skops"
        path.write_bytes(estimator)
        Path(str(path) + ".json").write_bytes(meta)
        return TileModel.load(path, expected_digest=expected_digest)


def meta_of(data: bytes) -> dict:
    (n,) = _LEN.unpack_from(data, 4)
    return json.loads(data[8:8 + n])


class ModelWatcher:
    """Follows the models topic; ``poll()`` returns a newer model for ``name`` when one arrived."""

    def __init__(self, bootstrap: str, name: str = "default", expected_digest: str | None = None):
        from kafka import KafkaConsumer, TopicPartition

        self.name = name
        self.expected_digest = expected_digest
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                      client_id=f"tilestream-models-{uuid.uuid4().hex[:6]}")
        self.parts = [TopicPartition(topics.MODELS, p) for p in sorted(self.consumer.partitions_for_topic(topics.MODELS) or [0])]
        self.consumer.assign(self.parts)
        self.consumer.seek_to_beginning(*self.parts)
        self.version = 0
        self.model_id: str | None = None
        self.refused = 0

    def latest(self) -> tuple[int, bytes | None]:
        """Read up to the end now: (newest version for the name, its record)."""
        end = self.consumer.end_offsets(self.parts)
        newest: tuple[int, bytes | None] = (self.version, None)
        while any(self.consumer.position(tp) < end[tp] for tp in self.parts):
            for records in self.consumer.poll(timeout_ms=1000).values():
                for m in records:
                    if m.key == self.name.encode() and m.value:
                        v = int(meta_of(m.value)["version"])
                        if v > newest[0]:
                            newest = (v, m.value)
        return newest

    def poll(self) -> TileModel | None:
        version, data = self.latest()
        if data is None:
            return None
        self.version = version
        try:
            model = unpack(data, self.expected_digest)
        except Exception:  # noqa: BLE001 - a bad model must never stop the classifier; the caller logs it
            self.refused += 1
            raise
        self.model_id = model.model_id
        return model

    def close(self) -> None:
        self.consumer.close()


def publish(bootstrap: str, path: str | Path, name: str = "default", expected_digest: str | None = None) -> int:
    """Publish the model at ``path`` as the next version of ``name``; returns that version."""
    from kafka import KafkaProducer

    TileModel.load(path, expected_digest=expected_digest)  # refuse here what classifiers would refuse
    watcher = ModelWatcher(bootstrap, name)
    try:
        version = watcher.latest()[0] + 1
    finally:
        watcher.close()
    record = pack(path, version)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                             max_request_size=len(record) + 64 * 1024)
    try:
        producer.send(topics.MODELS, key=name.encode(), value=record).get(timeout=60)
    finally:
        producer.close()
    return version
