"""Frame sources: a V4L2/USB device index, an RTSP or HTTP(S)/MJPEG URL, a video file, an image folder.

A source is an iterator of :class:`Captured` frames (BGR ``uint8`` arrays with the capture
time). :func:`resilient` wraps any source so that a camera that fails, disconnects or
delivers garbage is reopened with capped exponential backoff: the agent never exits because
of a camera, and every failure is logged with its reason and counted.

Image files (a folder, or one image file) are hostile input like a frame on the wire: before
OpenCV sees one, :func:`tilestream.imageinfo.check` (the processor's check) refuses a file
over :data:`FILE_LIMITS` (bytes, pixels, JPEG scans, decode budget) or of broken structure,
without decoding it: a 30000x30000 PNG of 875 KB cost the agent 18.7 s and 5.2 GiB to decode,
a 6000x6000 progressive JPEG of 447 KB with 4000 empty scans 34 s. A refused, unreadable or
undecodable file is reported with its reason (``too_large``, ``bad_image``,
``unsupported_format``, ``read_failed``: the agent counts them in
``source_errors_total{reason=...}``) and skipped; a file skipped for its extension is reported
once. A folder remembers what it delivered in a :class:`FolderProgress` that outlives the
iterator, so a reopened folder source goes on where it was and never delivers a file twice.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from tilestream.errors import Refused
from tilestream.imageinfo import FORMATS, DecodeLimits, ImageHeaderError, check

log = logging.getLogger("tilestream.agent.source")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
# Image files the agent decodes. Generous (the agent resizes to max_side and re-encodes within the
# topic's frame size): 64 MP is a 9248x6936 photo, 192 MB as BGR; 64 MiB of file is a PNG of that.
# Read before decoding; see the module docstring for what they stop.
FILE_LIMITS = DecodeLimits(max_bytes=64 * 1024 * 1024, max_pixels=64_000_000, formats=FORMATS)


class SourceError(Refused, RuntimeError):
    """A failure of the camera or stream; ``reason`` is a short code for the counters."""


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
                on_bad: Callable[[SourceError], None] | None = None,
                progress: "FolderProgress | None" = None, limits: DecodeLimits = FILE_LIMITS) -> Iterator[Captured]:
    """One attempt at a source; raises SourceError when it cannot be opened or breaks.

    ``progress``: a folder's memory of what it delivered, passed again to every reopening."""
    kind = describe(spec)
    if kind == "folder":
        return iter_folder(Path(spec), watch=watch, poll_s=poll_s, stop=stop, on_bad=on_bad, progress=progress,
                           limits=limits)
    if kind == "file" and not Path(spec).exists():
        raise SourceError("not_found", f"video file {spec} does not exist")
    if kind == "file" and Path(spec).suffix.lower() in IMAGE_SUFFIXES:
        # One image: read under the limits (cv2.VideoCapture would hand it to FFmpeg unchecked).
        return iter_image_file(Path(spec), on_bad=on_bad, progress=progress, limits=limits)
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


def read_image(path: Path, limits: DecodeLimits = FILE_LIMITS) -> np.ndarray:
    """Decode one image file under ``limits``; anything wrong is a SourceError with its reason.

    ``too_large`` (bytes, pixels, scans or decode budget over ``limits``), ``bad_image``
    (truncated or malformed, e.g. a JPEG without its end marker: libjpeg would decode it with
    grey rows; or one that OpenCV cannot decode), ``unsupported_format`` (not a format
    :mod:`tilestream.imageinfo` can bound), ``read_failed``. Nothing else escapes: no
    ``cv2.error``, no MemoryError.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_bytes:
                raise SourceError("too_large", f"image {path}: {size} bytes > limit {limits.max_bytes}")
            data = f.read(limits.max_bytes + 1)  # bounded even if the file grew since the stat
    except OSError as exc:
        raise SourceError("read_failed", f"cannot read image {path}: {exc}") from None
    if not data:
        raise SourceError("bad_image", f"image {path} is empty")
    try:
        info = check(data, limits)
    except ImageHeaderError as exc:
        raise SourceError(exc.reason, f"image {path}: {exc}") from None
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except Exception as exc:  # noqa: BLE001 - cv2.error, MemoryError: a bad file, never a broken source
        raise SourceError("bad_image", f"cannot decode image {path} ({len(data)} bytes): {exc}") from None
    if image is None:
        raise SourceError("bad_image", f"cannot decode image {path} ({len(data)} bytes)")
    if image.shape[:2] not in ((info.height, info.width), (info.width, info.height)):  # EXIF may rotate
        raise SourceError("bad_image", f"image {path} decoded to {image.shape[1]}x{image.shape[0]}, "
                                       f"its header says {info.width}x{info.height}")
    return image


@dataclass
class FolderProgress:
    """What a folder source has done, kept by its owner across reopenings of the source.

    ``delivered``: names handed out (each at most once, whatever happens to the iterator);
    ``bad``: name -> (size, mtime_ns) of the version that was refused (read again when it
    changes); ``skipped``: names refused for their extension (reported once each).
    """

    delivered: set[str] = field(default_factory=set)
    bad: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)


def _list_images(folder: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """(name -> (size, mtime_ns) of the image files of ``folder``, names of its other files)."""
    images, others = {}, []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except FileNotFoundError:  # removed between listing and stat
            continue
        if stat.S_ISDIR(st.st_mode):  # the stat we have, not a second one
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images[p.name] = (st.st_size, st.st_mtime_ns)
        else:
            others.append(p.name)
    return images, others


def iter_image_file(path: Path, *, on_bad: Callable[[SourceError], None] | None = None,
                    progress: FolderProgress | None = None, limits: DecodeLimits = FILE_LIMITS) -> Iterator[Captured]:
    """One image file as a source of one frame (delivered once, even if reopened with ``progress``).

    A file refused by :func:`read_image` is reported to ``on_bad`` and the source ends; without
    ``on_bad`` the SourceError is raised."""
    progress = progress if progress is not None else FolderProgress()
    if path.name in progress.delivered:
        return
    try:
        image = read_image(path, limits)
    except SourceError as err:
        if on_bad is None:
            raise
        on_bad(err)
        return
    progress.delivered.add(path.name)
    yield Captured(image, time.time_ns(), path.name)


def iter_folder(folder: Path, *, watch: bool = False, poll_s: float = 0.5, stop: threading.Event | None = None,
                on_bad: Callable[[SourceError], None] | None = None, progress: FolderProgress | None = None,
                limits: DecodeLimits = FILE_LIMITS) -> Iterator[Captured]:
    """Images of a folder in name order; with ``watch``, keep polling for new files.

    Each file name is delivered at most once, also across reopenings when the caller passes the
    same ``progress`` (the agent does: a source error never makes it send a file again). A file
    that :func:`read_image` refuses (too large, malformed, truncated JPEG, not decodable) and
    a file of another extension (``unsupported_format``, once per name) are reported to
    ``on_bad`` (counted, logged) and skipped; without ``on_bad`` a refused image raises and a
    file of another extension is only logged.

    With ``watch``, a file is read only once its size and modification time are the same in two
    listings in a row (a file still being written is left alone), a file that was bad is read
    again when it changes (a slow writer completed it), and a folder that disappears (unmounted,
    renamed) is reported once and waited for with the files already delivered remembered, so
    nothing is delivered twice when it comes back.
    """
    progress = progress if progress is not None else FolderProgress()
    delivered, bad = progress.delivered, progress.bad
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
            listing, others = _list_images(folder)
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
            for name in sorted(set(others) - progress.skipped):
                progress.skipped.add(name)
                err = SourceError("unsupported_format", f"{folder / name}: not an image by its extension "
                                                        f"(one of {', '.join(sorted(IMAGE_SUFFIXES))}), skipped")
                if on_bad is not None:
                    on_bad(err)
                else:  # a stray README is no reason to stop a source that has no one to report to
                    log.warning(json.dumps({"event": "file_skipped", "reason": err.reason, "error": str(err)}))
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
                    image = read_image(folder / name, limits)
                except Exception as exc:  # noqa: BLE001 - read_image raises SourceError only; belt and braces
                    bad[name] = sig
                    report(exc if isinstance(exc, SourceError) else SourceError("bad_image", f"{folder / name}: {exc!r}"))
                    continue
                bad.pop(name, None)
                last_seen.pop(name, None)
                delivered.add(name)  # before the yield: a consumer that stops here never gets it again
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
