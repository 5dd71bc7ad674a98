"""Frame sources: a V4L2/USB device index, an RTSP or HTTP(S)/MJPEG URL, a video file, an image folder.

A source is an iterator of :class:`Captured` frames (BGR ``uint8`` arrays with the capture
time). :func:`resilient` wraps any source so that a camera that fails, disconnects or
delivers garbage is reopened with capped exponential backoff: the agent never exits because
of a camera, and every failure is logged with its reason and counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

log = logging.getLogger("tilestream.agent.source")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


class SourceError(RuntimeError):
    """A failure of the camera or stream; ``reason`` is a short code for the counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Captured:
    image: np.ndarray
    capture_ns: int
    origin: str = ""  # file name for folder sources


def describe(spec: str) -> str:
    if spec.isdigit():
        return "device"
    if "://" in spec:
        return "stream"
    return "folder" if Path(spec).is_dir() else "file"


def open_source(spec: str, *, loop: bool = False, realtime: bool = False, watch: bool = False,
                poll_s: float = 0.5, stop: threading.Event | None = None,
                on_bad: Callable[[SourceError], None] | None = None) -> Iterator[Captured]:
    """One attempt at a source; raises SourceError when it cannot be opened or breaks."""
    kind = describe(spec)
    if kind == "folder":
        return iter_folder(Path(spec), watch=watch, poll_s=poll_s, stop=stop, on_bad=on_bad)
    if kind == "file" and not Path(spec).exists():
        raise SourceError("not_found", f"video file {spec} does not exist")
    return iter_capture(int(spec) if kind == "device" else spec, loop=loop and kind == "file",
                        realtime=realtime and kind == "file", live=kind in ("device", "stream"))


def iter_capture(target: int | str, *, loop: bool = False, realtime: bool = False, live: bool = False) -> Iterator[Captured]:
    """Frames from cv2.VideoCapture. For a live source, a failed read is a disconnect (SourceError);
    for a file it is the end (or the start again with ``loop``)."""
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        raise SourceError("open_failed", f"cannot open video source {target!r}")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        period = 1.0 / fps if (realtime and fps > 0) else 0.0
        next_at = time.monotonic()
        while True:
            ok, frame = cap.read()
            if not ok:
                if live:
                    raise SourceError("read_failed", f"{target!r} stopped delivering frames")
                if loop:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, frame = cap.read()
                if not ok:
                    return
            if period:
                next_at = max(next_at + period, time.monotonic() - period)
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield Captured(frame, time.time_ns())
    finally:
        cap.release()


def iter_folder(folder: Path, *, watch: bool = False, poll_s: float = 0.5, stop: threading.Event | None = None,
                on_bad: Callable[[SourceError], None] | None = None) -> Iterator[Captured]:
    """Images of a folder in name order; with ``watch``, keep polling for new files.

    An image that does not decode is reported to ``on_bad`` (counted, logged) and skipped;
    without ``on_bad`` it raises SourceError("bad_image").
    """
    seen: set[str] = set()
    while True:
        if not folder.is_dir():
            raise SourceError("not_found", f"image folder {folder} does not exist")
        new = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in seen)
        for path in new:
            seen.add(path.name)
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                err = SourceError("bad_image", f"cannot decode image {path}")
                if on_bad is None:
                    raise err
                on_bad(err)
                continue
            yield Captured(image, time.time_ns(), path.name)
        if not watch:
            return
        if stop is not None and stop.wait(poll_s):
            return
        if stop is None:
            time.sleep(poll_s)


class Backoff:
    """Capped exponential backoff: initial, doubling, at most ``cap`` seconds; reset on success."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0):
        self.initial, self.cap = initial, cap
        self.delay = initial

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.initial


def resilient(
    opener: Callable[[], Iterator[Captured]],
    on_error: Callable[[SourceError | Exception], None],
    stop: threading.Event,
    backoff: Backoff | None = None,
) -> Iterator[Captured]:
    """Frames from ``opener()``, reopened after every failure until ``stop`` is set.

    A source that ends normally (end of file, one pass over a folder) ends the iteration.
    """
    backoff = backoff or Backoff()
    while not stop.is_set():
        try:
            for captured in opener():
                backoff.reset()
                yield captured
                if stop.is_set():
                    return
            return
        except Exception as exc:  # noqa: BLE001 - a camera must never stop the agent
            on_error(exc)
            reason = getattr(exc, "reason", type(exc).__name__)
            delay = backoff.next()
            log.warning(json.dumps({"event": "source_retry", "reason": reason, "error": str(exc), "retry_in_s": delay}))
            if stop.wait(delay):
                return
