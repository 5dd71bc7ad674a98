"""The edge agent: source -> frame policy -> encode -> seal + sign -> disk spool -> Kafka.

Two threads and a spool between them:

* **capture** (the caller's thread): reads the source through :func:`edge_agent.sources.resilient`
  (reopened with capped exponential backoff, never fatal), applies the frame policy (target
  fps, resize, change gating), encodes, seals to the cloud key, signs with the device key and
  appends the sealed frame to the spool. Frames on disk are already encrypted.
* **sender** (:mod:`edge_agent.sender`, its docstring has the delivery design): hands spooled
  frames to a librdkafka producer (confluent-kafka; ``acks=all``, idempotent; why not kafka-python,
  with the figures: :mod:`kafkaio.rdkafka`) in capture order and acknowledges each one in the
  spool when Kafka acknowledged it. While the broker is unreachable nothing is acknowledged and
  the spool grows (bounded; when full: drop-oldest or pause capture, both counted). After a
  restart it first reconciles the spool with what is already on the topic, so no frame is on
  ``frames`` twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from kafkaio import Connection, connection
from tilestream import crypto
from tilestream.config import AgentSettings, cache_home
from tilestream.envelope import FrameHeader
from tilestream.errors import ConfigError, Refused
from tilestream.keys import DeviceKeys
from tilestream.metrics import Metrics

from edge_agent.encode import encode_image, resize_max_side
from edge_agent.sender import FrameSender
from edge_agent.sources import Backoff, FolderProgress, open_source, resilient
from edge_agent.spool import Spool, SpoolFull

log = logging.getLogger("tilestream.agent")

# Envelope bytes beyond the encoded image: header (45 + camera id), length, HPKE enc (up to 1120 for
# MLKEM768-X25519) + tag, signature.
ENVELOPE_OVERHEAD = 45 + 255 + 4 + 1120 + 16 + 64


class SeqCounter:
    """A per-camera sequence number that keeps increasing across restarts.

    The file holds a high-water mark reserved in blocks, so the agent writes it once per
    ``block`` frames; after a crash the next run starts above every seq ever used (a gap
    of at most ``block`` numbers, never a repeat).
    """

    def __init__(self, path: Path, block: int = 1000, at_least: int = 0):
        self.path = path
        self.block = block
        try:
            self._next = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            self._next = 0
        self._next = max(self._next, at_least)
        self._reserved = self._next

    def next(self) -> int:
        if self._next >= self._reserved:
            self._reserved = self._next + self.block
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(self._reserved))
            tmp.replace(self.path)
        seq = self._next
        self._next += 1
        return seq


@dataclass
class AgentCounters:
    captured: int = 0
    skipped: int = 0  # fps policy
    unchanged: int = 0  # change gating
    sealed: int = 0
    sent: int = 0  # acknowledged by Kafka
    already_on_topic: int = 0  # found by reconciliation, not sent again
    dropped: int = 0  # spool full, drop-oldest
    paused: int = 0  # spool full, capture paused (frames that waited)
    source_errors: int = 0
    send_errors: int = 0
    too_large: int = 0
    reencoded: int = 0
    heartbeats: int = 0
    last_seq: int = -1


def thumbnail(image: np.ndarray, width: int = 64) -> np.ndarray:
    """Small grayscale copy for change gating (pure)."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    return cv2.resize(gray, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA).astype(np.int16)


def changed_enough(prev: np.ndarray | None, cur: np.ndarray, threshold: float) -> bool:
    """Mean absolute difference of two thumbnails (0..255 scale) at least ``threshold``."""
    if prev is None or threshold <= 0 or prev.shape != cur.shape:
        return True
    return float(np.mean(np.abs(cur - prev))) >= threshold


class FrameTooLarge(Refused, ValueError):
    """A frame that does not fit the topic's frame size (after re-encoding, where allowed)."""

    def __init__(self, message: str):
        super().__init__("too_large", message)


def encode_within(image: np.ndarray, encoding: str, quality: int, max_bytes: int, reencode: bool) -> tuple[np.ndarray, bytes, int]:
    """Encode; if too large and ``reencode``, lower the quality, then downscale, until it fits.

    Returns (image actually encoded, bytes, number of re-encodes). Raises ValueError if it
    cannot fit (or ``reencode`` is off): :class:`FrameTooLarge`.
    """
    data = encode_image(image, encoding, quality)
    tries = 0
    if len(data) <= max_bytes:
        return image, data, 0
    if not reencode or encoding == "png":
        raise FrameTooLarge(f"encoded frame is {len(data)} bytes > {max_bytes}")
    q = quality
    while len(data) > max_bytes and q > 30:
        q = max(30, q - 20)
        data = encode_image(image, encoding, q)
        tries += 1
    while len(data) > max_bytes and min(image.shape[:2]) > 32:
        image = cv2.resize(image, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
        data = encode_image(image, encoding, q)
        tries += 1
    if len(data) > max_bytes:
        raise FrameTooLarge(f"frame still {len(data)} bytes > {max_bytes} after {tries} re-encodes")
    return image, data, tries


class EdgeAgent:
    def __init__(
        self,
        settings: AgentSettings,
        keystore: DeviceKeys,
        where: Connection | str,
        max_frame_bytes: int,
        state_dir: Path | None = None,
    ):
        self.settings = settings
        self.conn = connection(where)
        self.max_frame_bytes = max_frame_bytes
        self.cloud_kid, self.suite, self.cloud_public = keystore.cloud_public_key()
        self.device_kid, self.device_key = keystore.device_private_key(settings.camera_id)
        try:  # what every frame's header will carry, checked once here rather than failing each frame
            FrameHeader(camera_id=settings.camera_id, seq=0, capture_ns=0, width=1, height=1, encoding=settings.encoding,
                        cloud_key_id=self.cloud_kid, device_key_id=self.device_kid, suite=self.suite).pack()
        except ValueError as exc:
            raise ConfigError(f"agent.camera_id / keys: {exc}") from None
        self.state_dir = Path(state_dir or settings.state_dir or cache_home() / "agent" / settings.camera_id)
        self.spool = Spool(self.state_dir / "spool", settings.spool_max_bytes, settings.spool_when_full)
        self.seq = SeqCounter(self.state_dir / "seq", at_least=self.spool.last_seq + 1)
        self.counters = AgentCounters()
        self.metrics = Metrics("tilestream_agent")
        self._stop = threading.Event()  # stop capturing
        self._sender_stop = threading.Event()  # stop sending (after draining, or at shutdown)
        self.sender = FrameSender(settings, self.conn, self.spool, self.counters, self.metrics, self.state_dir,
                                  max_frame_bytes, self._sender_stop)
        self._last_prev: np.ndarray | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop (SIGTERM): stop capturing; what is in flight is sent or stays spooled."""
        self._stop.set()

    def run(self, drain_timeout_s: float | None = None, on_sent: Callable[[bytes], None] | None = None) -> AgentCounters:
        """Capture until the source ends or stop(); then drain the spool (bounded) and return."""
        self.sender.on_sent = on_sent
        sender = threading.Thread(target=self.sender.run, name="tilestream-sender", daemon=True)
        sender.start()
        try:
            self._capture_loop()
        finally:
            deadline = time.monotonic() + (self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
            while self.spool.frames and time.monotonic() < deadline and sender.is_alive():
                time.sleep(0.05)
            if self.spool.frames:
                log.warning(json.dumps({"event": "exit_with_spooled_frames", "frames": self.spool.frames,
                                        "bytes": self.spool.live_bytes}))
            self._sender_stop.set()
            sender.join(30)
            self.sender.publish_heartbeat(status="stopped")
            self.sender.close()
            self.sender.save_offsets()
            self.spool.close()
        return self.counters

    # -- capture ----------------------------------------------------------------------------
    def _source_error(self, exc: Exception) -> None:
        self.counters.source_errors += 1
        self.metrics.inc("source_errors_total", reason=getattr(exc, "reason", type(exc).__name__))
        log.warning(json.dumps({"event": "source_error", "reason": getattr(exc, "reason", type(exc).__name__),
                                "error": str(exc)}))

    def _capture_loop(self) -> None:
        s, c = self.settings, self.counters
        min_period = 1.0 / s.fps if s.fps > 0 else 0.0
        next_due = 0.0

        # One for the whole run: a folder (or image file) reopened after an error goes on where it
        # was, instead of sending what it already sent again under new seqs.
        progress = FolderProgress()

        def opener():
            return open_source(s.source, loop=s.loop, realtime=s.realtime, watch=s.watch, stop=self._stop,
                               on_bad=self._source_error, progress=progress)

        for captured in resilient(opener, self._source_error, self._stop, Backoff(0.5, s.backoff_max_s)):
            c.captured += 1
            now = time.monotonic()
            if min_period:
                # Even dropping: keep a frame when its slot is due; slots advance by the period.
                if now < next_due:
                    c.skipped += 1
                    continue
                next_due = max(next_due + min_period, now - min_period)
            image = resize_max_side(captured.image, s.max_side)
            if s.change_threshold > 0:
                thumb = thumbnail(image)
                if not changed_enough(self._last_prev, thumb, s.change_threshold):
                    c.unchanged += 1
                    continue
                self._last_prev = thumb
            self._seal_and_spool(image, captured.capture_ns)
            if s.max_frames and c.captured >= s.max_frames:
                break

    def seal(self, image: np.ndarray, capture_ns: int) -> tuple[FrameHeader, bytes]:
        """Encode (within the size limit), seal and sign one frame; assigns its seq."""
        s = self.settings
        image, data, reencodes = encode_within(image, s.encoding, s.jpeg_quality,
                                               self.max_frame_bytes - ENVELOPE_OVERHEAD, s.oversize == "reencode")
        self.counters.reencoded += reencodes > 0
        header = FrameHeader(
            camera_id=s.camera_id, seq=self.seq.next(), capture_ns=capture_ns, width=image.shape[1],
            height=image.shape[0], encoding=s.encoding, cloud_key_id=self.cloud_kid, device_key_id=self.device_kid,
            suite=self.suite,
        )
        return header, crypto.seal_frame(data, header, self.cloud_public, self.device_key)

    def _seal_and_spool(self, image: np.ndarray, capture_ns: int) -> None:
        c = self.counters
        try:
            header, blob = self.seal(image, capture_ns)
        except FrameTooLarge as exc:
            c.too_large += 1
            self.metrics.inc("too_large_total")
            log.error(json.dumps({"event": "frame_too_large", "camera_id": self.settings.camera_id, "error": str(exc)}))
            return
        c.sealed += 1
        c.last_seq = header.seq
        key = header.frame_id.encode()
        waited = False
        while True:
            dropped_before = self.spool.dropped
            try:
                self.spool.append(key, blob, header.seq)
                c.dropped += self.spool.dropped - dropped_before
                return
            except SpoolFull:
                if not waited:
                    c.paused += 1
                    waited = True
                    log.warning(json.dumps({"event": "spool_full_paused", "frames": self.spool.frames}))
                if self._stop.is_set():
                    # Shutting down with a full spool (when_full="block"): this frame has nowhere to go.
                    c.dropped += 1
                    self.metrics.inc("dropped_at_shutdown_total")
                    log.warning(json.dumps({"event": "frame_dropped_at_shutdown", "seq": header.seq,
                                            "reason": "spool full", "frames": self.spool.frames}))
                    return
                self.spool.wait_for_space(len(key) + len(blob), timeout=0.5)

    # -- state -------------------------------------------------------------------------------
    def health(self) -> dict:
        """``/healthz``. A failing camera is retried for ever and does not make the agent unhealthy
        (``status`` stays "ok": restarting the process would not bring the camera back), but
        ``source_errors`` shows it."""
        c = self.counters
        return {"status": "ok", "camera_id": self.settings.camera_id, "connected": self.sender.connected,
                "spool_frames": self.spool.frames, "spool_bytes": self.spool.live_bytes, "captured": c.captured,
                "sent": c.sent, "source_errors": c.source_errors, "send_errors": c.send_errors}

    def render_metrics(self) -> str:
        for name, value in asdict(self.counters).items():
            if name == "source_errors" and value:
                # Counted per reason (``source_errors_total{reason=...}``) by _source_error; an
                # unlabelled copy would make every sum over the family count each error twice.
                self.metrics.gauges.pop(("source_errors_total", ()), None)
                continue
            self.metrics.set(name if name == "last_seq" else f"{name}_total", value)
        self.metrics.set("spool_frames", self.spool.frames)
        self.metrics.set("spool_bytes", self.spool.live_bytes)
        self.metrics.set("spool_head_rebuilt_total", self.spool.head_rebuilt)
        self.metrics.set("connected", 1.0 if self.sender.connected else 0.0)
        return self.metrics.render()
