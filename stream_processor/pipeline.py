"""Per-frame processing without I/O: open -> decode under limits -> tile -> features.

:class:`FrameProcessor` is the pure compute inside :class:`stream_processor.stage.ProcessorStage`
(the worker's per-record path, which adds the replay check, fan-out, dead letters, MACed records
and marks: time and test that, ``ProcessorStage.on_frame``); training calls the same
:func:`image_tile_features`, so a model never sees features computed another way than the ones
it is served. :meth:`FrameProcessor.process` (verify + compute, no replay check, no fan-out) is
kept for the benchmarks that time the compute alone. Replay protection is
:mod:`stream_processor.replay`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import cv2
import numpy as np

from tilestream import crypto
from tilestream.config import FeatureConfig
from tilestream.crypto import DeviceKey, FrameRejected
from tilestream.envelope import Envelope, FrameHeader
from tilestream.imageinfo import DecodeLimits, ImageHeaderError, check
from tilestream.records import TileBatch

from stream_processor.features import tiles_features
from stream_processor.tiling import Tile, split


def decode_image(data: bytes, header: FrameHeader, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode to grayscale under limits.

    Everything that can be known without decoding is checked first, by
    :func:`tilestream.imageinfo.check`: encoded size, format, structure (a truncated or
    malformed file is ``bad_image``), declared pixels (a decompression bomb: a small file
    declaring a huge image) and decode work (a progressive JPEG of thousands of scans: its
    cost grows with scans x pixels; a PNG with zlib data after its rows): over a limit is
    ``too_large``. The size must also match the one the (signed) envelope header declares.
    """
    fid = header.frame_id
    try:
        info = check(data, DecodeLimits(max_bytes, max_pixels))
    except ImageHeaderError as exc:
        # unsupported_format (not JPEG/PNG/WebP, an animated WebP) is a bad image on the wire.
        reason = "too_large" if exc.reason == "too_large" else "bad_image"
        raise FrameRejected(reason, f"frame {fid}: {exc}", header) from None
    fmt, width, height = info.format, info.width, info.height
    if (width, height) != (header.width, header.height) or fmt != header.encoding:
        raise FrameRejected(
            "bad_image", f"frame {fid}: image is {fmt} {width}x{height}, envelope says {header.encoding} "
            f"{header.width}x{header.height}", header)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as exc:  # OpenCV raises for some malformed files instead of returning None
        raise FrameRejected("bad_image", f"frame {fid}: the {fmt} payload does not decode: {exc}", header) from None
    if image is None:
        raise FrameRejected("bad_image", f"frame {fid}: the {header.encoding} payload does not decode", header)
    if image.shape != (header.height, header.width):
        raise FrameRejected(
            "bad_image",
            f"frame {fid}: decoded {image.shape[1]}x{image.shape[0]}, header says {header.width}x{header.height}",
            header,
        )
    return image


def image_tile_features(gray: np.ndarray, cfg: FeatureConfig) -> list[tuple[Tile, np.ndarray]]:
    """Tiles of a grayscale image with their feature vectors: the one feature code path.

    All tiles at once (:func:`stream_processor.features.tiles_features`, bit for bit the
    per-tile ``tile_features`` vectors, ~1.7x cheaper on vtest); the vectors are rows of one
    ``(n_tiles, feature_length)`` float32 array.
    """
    pairs = split(gray, cfg)
    X = tiles_features([pixels for _, pixels in pairs], cfg)
    return [(tile, X[i]) for i, (tile, _) in enumerate(pairs)]


@dataclass
class StageTimes:
    verify: float = 0.0
    open: float = 0.0
    decode: float = 0.0
    features: float = 0.0


class FrameProcessor:
    def __init__(
        self,
        cloud_keys: Mapping[bytes, object],
        devices: Callable[[bytes], DeviceKey | None],
        cfg: FeatureConfig,
        max_bytes: int,
        max_pixels: int,
    ):
        self.cloud_keys = cloud_keys
        self.devices = devices
        self.cfg = cfg
        self.digest = cfg.digest()
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def verify(self, blob: bytes) -> Envelope:
        """Parse and check the device signature (cheap: ~0.1 ms). Raises FrameRejected."""
        return crypto.verify_frame(blob, self.devices)

    def process(self, blob: bytes) -> tuple[list[TileBatch], StageTimes]:
        """Sealed frame bytes -> the frame's TileBatch record(s). Raises FrameRejected."""
        t0 = time.perf_counter()
        env = self.verify(blob)
        verify_s = time.perf_counter() - t0
        records, times = self.process_verified(env)
        times.verify = verify_s
        return records, times

    def open_and_decode(self, env: Envelope, times: StageTimes) -> np.ndarray:
        """Open a verified envelope and decode its image under the limits (grayscale)."""
        t1 = time.perf_counter()
        data = crypto.open_envelope(env, self.cloud_keys)
        t2 = time.perf_counter()
        gray = decode_image(data, env.header, self.max_bytes, self.max_pixels)
        times.open, times.decode = t2 - t1, time.perf_counter() - t2
        return gray

    def process_verified(self, env: Envelope) -> tuple[list[TileBatch], StageTimes]:
        """Open, decode, tile and compute features of a frame whose signature was verified."""
        times = StageTimes()
        gray = self.open_and_decode(env, times)
        return self.features_of(env.header, gray, times), times

    def features_of(self, header: FrameHeader, gray: np.ndarray, times: StageTimes) -> list[TileBatch]:
        """The features of every tile of a decoded frame, as one TileBatch record."""
        t3 = time.perf_counter()
        tiles = image_tile_features(gray, self.cfg)
        times.features = time.perf_counter() - t3
        now = time.time_ns()
        if not tiles:
            raise FrameRejected("bad_image", f"frame {header.frame_id}: {header.width}x{header.height} yields no tiles", header)
        return [TileBatch.make(header, len(tiles), tiles, self.digest, now)]
