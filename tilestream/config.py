"""The one home of tilestream's configuration.

Every stage reads its settings from a :class:`Settings` built by :func:`load_settings`:
defaults defined here, overridden by a TOML file (``--config`` or ``$TILESTREAM_CONFIG``),
overridden by environment variables ``TILESTREAM_<SECTION>_<KEY>`` (for example
``TILESTREAM_KAFKA_BOOTSTRAP=127.0.0.1:9092``), overridden by command-line flags.

:class:`FeatureConfig` is part of the contract between the processor and the model:
its :meth:`FeatureConfig.digest` is stamped on every tile-features record and on every
trained model, and a model is refused when the digests differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from tilestream.errors import ConfigError


def cache_home() -> Path:
    """Per-user cache for Kafka jars, broker data, sample data and keys (never the repo)."""
    env = os.environ.get("TILESTREAM_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tilestream"


@dataclass
class KafkaSettings:
    # None means "no broker configured": `tilestream demo` then starts the local one.
    bootstrap: str | None = None
    # Local broker (deploy/local_kafka.py).
    version: str = "4.1.1"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    # Topic layout; partition counts are the unit of parallelism of each stage.
    frames_partitions: int = 6
    tile_features_partitions: int = 6
    tile_jobs_partitions: int = 6
    results_partitions: int = 3
    max_frame_bytes: int = 4 * 1024 * 1024
    # Replication of the pipeline's topics: 1 on a single node; 3 with min_insync_replicas 2 on a
    # cluster (an acknowledged frame then survives the loss of any one broker).
    replication_factor: int = 1
    min_insync_replicas: int = 1
    # Transport security of every client (kafkaio.connection): PLAINTEXT on loopback; SSL (server
    # verified against ssl_cafile; with ssl_certfile/ssl_keyfile mutual TLS) or SASL_SSL (SCRAM) elsewhere.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str = ""
    # The password never sits in this file: $TILESTREAM_SASL_PASSWORD or this file (mode 0600).
    sasl_password_file: str = ""


@dataclass
class FeatureConfig:
    """Tiling and feature parameters: the seed chain and the HOG descriptor.

    I_pre = a*I + b (saturated), I_bin = 255 where I_pre >= T else 0,
    I_edge = sum_ij w(i,j) * I_bin(x+i, y+j), F(x,y) = sum_i w_i * I_edge(x-i, y).
    """

    tile_size: int = 64
    overlap: int = 0
    # What happens to tiles at the right/bottom edge when the frame does not divide evenly:
    # "pad" (replicate the border up to the full tile size), "shrink" (smaller tile) or "drop".
    edge_policy: Literal["pad", "shrink", "drop"] = "pad"
    a: float = 1.0
    b: float = 0.0
    T: int = 128
    kernel: tuple[tuple[float, ...], ...] = ((-1, -1, -1), (-1, 8, -1), (-1, -1, -1))
    w_i: tuple[float, ...] = (1.0,)
    hog_cell: int = 16
    hog_bins: int = 9
    # Whether to deskew (moment-based, as in OpenCV's digits sample) before HOG.
    deskew: bool = False
    # Moment normalisation before HOG (deskew + centre + scale the 4-sigma box of the longer
    # axis to norm_box px, aspect ratio mapped by sqrt(sin(pi/2 * r))) onto a norm_size^2
    # canvas (0: tile_size; norm_box 0: the canvas side). Takes precedence over `deskew`.
    moment_norm: bool = False
    norm_size: int = 0
    norm_box: float = 0.0
    # Signed gradient orientation (bins over 360 degrees) instead of unsigned (180).
    hog_signed: bool = False
    # Non-empty: HOG pooled on n x n grids of overlapping cells (bilinear votes between cell
    # centres), one Hellinger-normalised histogram per grid, concatenated; hog_cell unused.
    hog_grids: tuple[int, ...] = ()
    # Whether the vector carries the seed-chain (4) and intensity (12) values around the HOG.
    stats: bool = True

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kernel"] = [list(r) for r in self.kernel]
        d["w_i"] = list(self.w_i)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureConfig":
        d = dict(d)
        if "kernel" in d:
            d["kernel"] = tuple(tuple(float(v) for v in r) for r in d["kernel"])
        if "w_i" in d:
            d["w_i"] = tuple(float(v) for v in d["w_i"])
        return cls(**d)

    def digest(self) -> str:
        """Stable short hash of the configuration (order-independent JSON, floats normalised)."""
        d = self.as_dict()
        d["kernel"] = [[float(v) for v in r] for r in d["kernel"]]
        d["w_i"] = [float(v) for v in d["w_i"]]
        d["a"], d["b"] = float(d["a"]), float(d["b"])
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class AgentSettings:
    camera_id: str = "cam-1"
    # Video file, image folder, V4L2 device index ("0") or rtsp:// / http(s):// URL.
    source: str = ""
    fps: float = 0.0  # target frames/s; faster sources are dropped evenly (counted as skipped). 0: all
    max_side: int = 0  # resize so the longer side is at most this; 0: no resize
    encoding: Literal["jpeg", "png", "webp"] = "jpeg"
    jpeg_quality: int = 80  # also the WebP quality
    # Change gating: skip a frame whose 64-px thumbnail differs from the last sent one by less
    # than this mean absolute difference (0..255); counted as unchanged. 0: off.
    change_threshold: float = 0.0
    max_frames: int = 0  # stop after this many captured frames; 0: until the source ends
    loop: bool = False  # video files: start again at the end
    realtime: bool = False  # video files: pace at the file's fps
    watch: bool = False  # image folders: keep watching for new files
    # Frames larger than the topic allows: "reencode" (lower quality, then downscale) or "reject".
    oversize: Literal["reencode", "reject"] = "reencode"
    state_dir: str = ""  # seq counter, spool, acked offsets (default ~/.cache/tilestream/agent/<camera>)
    spool_max_bytes: int = 1024 * 1024 * 1024
    spool_when_full: Literal["drop_oldest", "block"] = "drop_oldest"  # block: pause capture
    max_in_flight: int = 64
    delivery_timeout_s: float = 120.0
    backoff_max_s: float = 30.0
    heartbeat_interval_s: float = 5.0
    drain_timeout_s: float = 30.0  # at the end of a finite source, wait this long for the spool to drain
    http_port: int = 0  # /healthz and /metrics; 0: off
    # The device bundle (`tilestream keys enroll`): device private key, camera id, cloud public key.
    # Default: bundles/<camera_id>.bundle next to the keys directory.
    bundle: str = ""


@dataclass
class ProcessorSettings:
    app_id: str = "tilestream-processor"
    web_port: int = 6066
    workers_threads: int = 2
    max_image_pixels: int = 40_000_000
    # Replay protection (stream_processor/replay.py): a frame captured more than max_frame_age_s
    # before it reached Kafka (broker append time), or more than max_clock_skew_s after, is
    # `stale`; 6 h outlasts an afternoon's edge network outage (spooled frames), a processor
    # outage does not age the backlog, and a frame copied days later is refused. A (camera, seq)
    # accepted before is `replay`, and so is a seq more than replay_window_seqs below the camera's
    # highest (65536: 43 min of reordering between partitions at 25 fps). Marks of other workers
    # are read every replay_sync_interval_s.
    max_frame_age_s: float = 6 * 3600.0
    max_clock_skew_s: float = 120.0
    replay_window_seqs: int = 65536
    replay_sync_interval_s: float = 0.5
    metrics_interval_s: float = 2.0
    # Faust's periodic offset commit: every commit_interval_s, or after commit_every acked records
    # (each commit flushes the producer first). A rebalance commits too (stream_processor.transport).
    commit_interval_s: float = 1.0
    commit_every: int = 100
    # How fast a dead worker's partitions move to the others (Faust's default is 60 s).
    session_timeout_s: float = 10.0
    # Frames of at least this many pixels are split into bands of tile rows that go through the
    # tile-jobs topic (encrypted), so one large frame is computed by several workers.
    fanout_min_pixels: int = 4_000_000
    fanout_bands: int = 0  # 0: one band per tile-jobs partition
    # /healthz reports "stalled" (503) when the loop stops, no frames/tile-jobs partition is held,
    # or records wait and none was read, for this long (tilestream.metrics.Liveness).
    stall_after_s: float = 60.0


@dataclass
class ClassifierSettings:
    group_id: str = "tilestream-classifier"
    model_path: str = ""
    frame_timeout_s: float = 30.0
    # After (re)assignment, results produced since (first re-read tile's time - margin) are
    # read back so frames answered before a crash or rebalance are not answered twice.
    dedup_margin_s: float = 120.0
    metrics_interval_s: float = 2.0
    # /healthz reports "stalled" when records wait on assigned partitions (or no partition is
    # assigned while the group has work) and nothing was read for this long.
    stall_after_s: float = 60.0


@dataclass
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    agent: AgentSettings = field(default_factory=AgentSettings)
    processor: ProcessorSettings = field(default_factory=ProcessorSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    # Key material: cloud keys, tile-job keys, admin public keys, the signed device registry.
    keys_dir: str = ""

    def keys_path(self) -> Path:
        return Path(self.keys_dir).expanduser() if self.keys_dir else cache_home() / "keys"


def _coerce(current: Any, raw: str) -> Any:
    if isinstance(current, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, tuple):
        return tuple(json.loads(raw))
    return raw


def _apply(section: Any, values: dict[str, Any], where: str) -> None:
    names = {f.name.lower(): f.name for f in dataclasses.fields(section)}
    hints = get_type_hints(type(section))
    for given, value in values.items():
        key = names.get(given.lower())
        if key is None:
            raise ConfigError(f"{where}: unknown setting {given!r} (known: {', '.join(sorted(names.values()))})")
        current = getattr(section, key)
        try:
            if isinstance(value, str) and not isinstance(current, str) and current is not None:
                value = _coerce(current, value)
            elif isinstance(current, tuple) and isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key} = {value!r}: {exc}") from None
        choices = get_args(hints.get(key)) if get_origin(hints.get(key)) is Literal else ()
        if choices and value not in choices:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, choices))}")
        setattr(section, key, value)


SECTIONS = ("kafka", "features", "agent", "processor", "classifier")


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file, then ``TILESTREAM_<SECTION>_<KEY>`` environment variables."""
    env = dict(os.environ if env is None else env)
    settings = Settings()
    path = path or env.get("TILESTREAM_CONFIG")
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        for name, values in data.items():
            if name in SECTIONS:
                _apply(getattr(settings, name), values, f"{path} [{name}]")
            elif name == "keys_dir":
                settings.keys_dir = str(values)
            else:
                raise ConfigError(f"{path}: unknown section {name!r}")
    for name in SECTIONS:
        section = getattr(settings, name)
        prefix = f"TILESTREAM_{name.upper()}_"
        _apply(
            section,
            {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)},
            "environment",
        )
    if env.get("TILESTREAM_KEYS_DIR"):
        settings.keys_dir = env["TILESTREAM_KEYS_DIR"]
    return settings
