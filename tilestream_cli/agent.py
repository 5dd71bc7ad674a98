"""``tilestream agent``: the edge agent (source -> sealed frames -> Kafka)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from tilestream.config import Settings

from kafkaio import Connection


def cmd_agent(args: argparse.Namespace, settings: Settings) -> int:
    from edge_agent.agent import EdgeAgent
    from tilestream.errors import ConfigError
    from tilestream.keys import DeviceBundle, default_bundle_path
    from tilestream.metrics import serve_http

    a = settings.agent
    for name in ("source", "camera_id", "fps", "max_frames", "max_side", "encoding", "jpeg_quality", "change_threshold",
                 "state_dir", "spool_max_bytes", "spool_when_full", "http_port", "heartbeat_interval_s", "drain_timeout_s",
                 "bundle"):
        value = getattr(args, name)
        if value is not None:
            setattr(a, name, value)
    a.loop = a.loop or args.loop
    a.realtime = a.realtime or args.realtime
    a.watch = a.watch or args.watch
    if not a.source:
        print("error: no source (--source PATH|URL|DEVICE_INDEX or [agent] source in the config)", file=sys.stderr)
        return 2
    # The camera's keys come from its device bundle only (`tilestream keys enroll` made it).
    bundle = Path(a.bundle).expanduser() if a.bundle else default_bundle_path(settings.keys_path(), a.camera_id)
    try:
        keys = DeviceBundle.load(bundle)
    except FileNotFoundError:
        print(f"error: no device bundle at {bundle} (--bundle FILE or [agent] bundle; made by "
              f"`tilestream keys enroll {a.camera_id}`)", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The camera's own broker principal comes from its bundle (`keys enroll --broker`), if it has one.
    try:
        conn = Connection.from_settings(settings.kafka, args.bootstrap, credentials=keys.kafka)
        conn.ssl_context()  # a bundle's client certificate that does not load is refused now, not at the first send
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    agent = EdgeAgent(a, keys, conn, settings.kafka.max_frame_bytes)
    if a.http_port:
        from types import SimpleNamespace

        serve_http(SimpleNamespace(render=agent.render_metrics), a.http_port, agent.health)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    counters = agent.run()
    print(json.dumps({"event": "agent_done", "camera_id": a.camera_id, **vars(counters)}), flush=True)
    return 0


def register(sub) -> None:
    a = sub.add_parser("agent", help="run the edge agent")
    a.add_argument("--source", help="video file, image folder, device index or rtsp/http URL")
    a.add_argument("--camera-id")
    a.add_argument("--bundle", help="device bundle from `tilestream keys enroll` (default bundles/CAMERA.bundle "
                                    "next to the keys directory)")
    a.add_argument("--fps", type=float)
    a.add_argument("--max-frames", type=int)
    a.add_argument("--max-side", type=int)
    a.add_argument("--encoding", choices=["jpeg", "png", "webp"])
    a.add_argument("--jpeg-quality", type=int)
    a.add_argument("--change-threshold", type=float, help="skip frames whose thumbnail changed less than this (0..255)")
    a.add_argument("--loop", action="store_true")
    a.add_argument("--realtime", action="store_true", help="pace a video file at its own fps")
    a.add_argument("--watch", action="store_true", help="image folder: keep watching for new files")
    a.add_argument("--state-dir", help="seq counter, spool and offsets (default ~/.cache/tilestream/agent/CAMERA)")
    a.add_argument("--spool-max-bytes", type=int)
    a.add_argument("--spool-when-full", choices=["drop_oldest", "block"])
    a.add_argument("--http-port", type=int, help="serve /healthz and /metrics on this port")
    a.add_argument("--heartbeat-interval-s", type=float)
    a.add_argument("--drain-timeout-s", type=float, help="at the end of a finite source, wait this long to send the spool")
    a.set_defaults(func=cmd_agent)
