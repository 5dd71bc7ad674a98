"""Frame sources: a V4L2/USB device index, an RTSP or HTTP(S)/MJPEG URL, a video file, an image folder.

A source is an iterator of :class:`Captured` frames (BGR ``uint8`` arrays with the capture
time). :func:`resilient` wraps any source so that a camera that fails, disconnects or
delivers garbage is reopened with capped exponential backoff: the agent never exits because
of a camera, and every failure is logged with its reason and counted.
"""

from __future__ import annotations

import json
import logging
import stat
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


def jpeg_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole JPEG, up to its end-of-image marker.

    libjpeg decodes a truncated JPEG (a file still being written, a cut upload) with only a
    warning and grey rows at the bottom, so ``cv2.imread`` would hand back a damaged frame.
    Walks the marker segments (skipping their payloads, e.g. an EXIF thumbnail with its own
    EOI) and the entropy-coded data after each SOS; bytes after EOI are allowed.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker other than FF00 and RSTn
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return False
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    i = j + (1 if nxt == 0xFF else 2)
                    continue
                i = j
                break
    return i + 2 <= n and data[i:i + 2] == b"\xff\xd9"


def read_image(path: Path) -> np.ndarray:
    """Decode one image file; SourceError("bad_image") if it does not decode or is a truncated JPEG."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError("read_failed", f"cannot read image {path}: {exc}") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise SourceError("bad_image", f"cannot decode image {path} ({len(data)} bytes)")
    if data.startswith(b"\xff\xd8") and not jpeg_complete(data):
        raise SourceError("bad_image", f"truncated JPEG {path} ({len(data)} bytes, no end of image)")
    return image


def _list_images(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime_ns) of the image files of ``folder``."""
    out = {}
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # removed between listing and stat
            continue
        if not stat.S_ISDIR(st.st_mode):  # the stat we have, not a second one
            out[p.name] = (st.st_size, st.st_mtime_ns)
    return out


def iter_folder(folder: Path, *, watch: bool = False, poll_s: float = 0.5, stop: threading.Event | None = None,
                on_bad: Callable[[SourceError], None] | None = None) -> Iterator[Captured]:
    """Images of a folder in name order; with ``watch``, keep polling for new files.

    Each file name is delivered at most once. An image that does not decode (or is a truncated
    JPEG) is reported to ``on_bad`` (counted, logged) and skipped; without ``on_bad`` it raises
    SourceError("bad_image").

    With ``watch``, a file is read only once its size and modification time are the same in two
    listings in a row (a file still being written is left alone), a file that was bad is read
    again when it changes (a slow writer completed it), and a folder that disappears (unmounted,
    renamed) is reported once and waited for with the files already delivered remembered, so
    nothing is delivered twice when it comes back.
    """
    delivered: set[str] = set()
    bad: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) of the version that did not decode
    last_seen: dict[str, tuple[int, int]] = {}  # watch: name -> (size, mtime) at the previous listing
    missing = False

    def report(err: SourceError) -> None:
        if on_bad is None:
            raise err
        on_bad(err)

    while True:
        try:
            if not folder.is_dir():
                raise FileNotFoundError(str(folder))
            listing = _list_images(folder)
        except OSError as exc:
            err = SourceError("not_found" if isinstance(exc, FileNotFoundError) else "list_failed",
                              f"image folder {folder} cannot be listed: {exc}")
            if not watch or on_bad is None:
                raise err from None
            if not missing:
                on_bad(err)
                missing = True
        else:
            missing = False
            ready = []
            for name in sorted(listing):
                sig = listing[name]
                if name in delivered or bad.get(name) == sig:
                    continue
                if watch and last_seen.get(name) != sig:
                    continue  # new or still changing: read it when it stopped changing
                ready.append((name, sig))
            if watch:
                last_seen = {n: sig for n, sig in listing.items() if n not in delivered}
            for name, sig in ready:
                try:
                    image = read_image(folder / name)
                except SourceError as err:
                    bad[name] = sig
                    report(err)
                    continue
                bad.pop(name, None)
                last_seen.pop(name, None)
                delivered.add(name)
                yield Captured(image, time.time_ns(), name)
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
