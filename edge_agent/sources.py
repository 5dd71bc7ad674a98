"""Frame sources: a video file, a V4L2/USB device index, an RTSP/HTTP(S) stream, an image folder.

A source is an iterator of :class:`Captured` frames (BGR ``uint8`` arrays with the capture time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


class SourceError(RuntimeError):
    pass


@dataclass
class Captured:
    image: np.ndarray
    capture_ns: int


def describe(spec: str) -> str:
    if spec.isdigit():
        return "device"
    if "://" in spec:
        return "stream"
    return "folder" if Path(spec).is_dir() else "file"


def open_source(spec: str, *, loop: bool = False, realtime: bool = False) -> Iterator[Captured]:
    kind = describe(spec)
    if kind == "folder":
        return iter_folder(Path(spec))
    if kind == "file" and not Path(spec).exists():
        raise SourceError(f"video file {spec} does not exist")
    return iter_capture(int(spec) if kind == "device" else spec, loop=loop and kind == "file", realtime=realtime)


def iter_capture(target: int | str, *, loop: bool = False, realtime: bool = False) -> Iterator[Captured]:
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        raise SourceError(f"cannot open video source {target!r}")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        period = 1.0 / fps if (realtime and fps > 0) else 0.0
        next_at = time.monotonic()
        while True:
            ok, frame = cap.read()
            if not ok:
                if loop:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, frame = cap.read()
                if not ok:
                    return
            if period:
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield Captured(frame, time.time_ns())
    finally:
        cap.release()


def iter_folder(folder: Path) -> Iterator[Captured]:
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SourceError(f"cannot decode image {path}")
        yield Captured(image, time.time_ns())
