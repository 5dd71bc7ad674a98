"""The edge agent loop: source -> policy -> encode -> seal + sign -> Kafka.

Thin shell: image work is :mod:`edge_agent.encode`, cryptography is :mod:`tilestream.crypto`,
the wire format is :mod:`tilestream.envelope`; this module wires them to a source and a
kafka-python producer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tilestream import crypto, topics
from tilestream.config import AgentSettings, cache_home
from tilestream.envelope import FrameHeader, frame_id
from tilestream.keys import KeyStore

from edge_agent.encode import encode_image, resize_max_side
from edge_agent.sources import open_source

log = logging.getLogger("tilestream.agent")


class SeqCounter:
    """A per-camera sequence number that keeps increasing across restarts.

    The file holds a high-water mark reserved in blocks, so the agent writes it once per
    ``block`` frames; after a crash the next run starts above every seq ever used (a gap
    of at most ``block`` numbers, never a repeat).
    """

    def __init__(self, path: Path, block: int = 1000):
        self.path = path
        self.block = block
        try:
            self._next = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            self._next = 0
        self._reserved = self._next

    def next(self) -> int:
        if self._next >= self._reserved:
            self._reserved = self._next + self.block
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(self._reserved))
            os.replace(tmp, self.path)
        seq = self._next
        self._next += 1
        return seq


@dataclass
class AgentCounters:
    captured: int = 0
    skipped: int = 0
    sent: int = 0
    send_errors: int = 0
    too_large: int = 0
    last_seq: int = -1


class EdgeAgent:
    def __init__(
        self,
        settings: AgentSettings,
        keystore: KeyStore,
        bootstrap: str,
        max_frame_bytes: int,
        state_dir: Path | None = None,
    ):
        self.settings = settings
        self.bootstrap = bootstrap
        self.max_frame_bytes = max_frame_bytes
        self.cloud_kid, self.cloud_public = keystore.cloud_public_key()
        self.device_kid, self.device_key = keystore.device_private_key(settings.camera_id)
        state_dir = state_dir or cache_home() / "agent" / settings.camera_id
        self.seq = SeqCounter(state_dir / "seq")
        self.counters = AgentCounters()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def seal(self, image, capture_ns: int) -> tuple[FrameHeader, bytes]:
        s = self.settings
        image = resize_max_side(image, s.max_side)
        data = encode_image(image, s.encoding, s.jpeg_quality)
        header = FrameHeader(
            camera_id=s.camera_id,
            seq=self.seq.next(),
            capture_ns=capture_ns,
            width=image.shape[1],
            height=image.shape[0],
            encoding=s.encoding,
            cloud_key_id=self.cloud_kid,
            device_key_id=self.device_kid,
        )
        return header, crypto.seal_frame(data, header, self.cloud_public, self.device_key)

    def _producer(self):
        from kafka import KafkaProducer

        return KafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"tilestream-agent-{self.settings.camera_id}",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=self.max_frame_bytes + 64 * 1024,
            retries=2**31 - 1,
            delivery_timeout_ms=120000,
        )

    def run(self, on_sent: Callable[[FrameHeader], None] | None = None) -> AgentCounters:
        s = self.settings
        producer = self._producer()
        min_period = 1.0 / s.fps if s.fps > 0 else 0.0
        last_sent_at = 0.0
        c = self.counters
        try:
            for captured in open_source(s.source, loop=s.loop, realtime=s.realtime):
                if self._stop.is_set():
                    break
                c.captured += 1
                now = time.monotonic()
                if min_period and now - last_sent_at < min_period:
                    c.skipped += 1
                    continue
                last_sent_at = now
                header, blob = self.seal(captured.image, captured.capture_ns)
                if len(blob) > self.max_frame_bytes:
                    c.too_large += 1
                    log.error(json.dumps({"event": "frame_too_large", "frame_id": header.frame_id, "bytes": len(blob),
                                          "max_bytes": self.max_frame_bytes}))
                    continue
                fut = producer.send(topics.FRAMES, key=header.frame_id.encode(), value=blob)
                fut.add_callback(self._sent, header, on_sent)
                fut.add_errback(self._failed, header)
                if s.max_frames and c.captured >= s.max_frames:
                    break
        finally:
            producer.flush()
            producer.close()
        return c

    def _sent(self, header: FrameHeader, on_sent, _metadata) -> None:
        c = self.counters
        c.sent += 1
        c.last_seq = max(c.last_seq, header.seq)
        if on_sent:
            on_sent(header)

    def _failed(self, header: FrameHeader, exc: Exception) -> None:
        self.counters.send_errors += 1
        log.error(json.dumps({"event": "send_failed", "frame_id": frame_id(header.camera_id, header.seq), "error": str(exc)}))
