"""Edge agent cost on vtest.avi at JPEG q80: capture+encode alone vs capture+encode+seal+sign+publish.

    python -m benchmarks.agent_bench [--frames 400]

Goal (issue 3): sealing, signing and publishing add at most 10% CPU over capture+encode.
Both runs read the same frames from the file; the second one goes through the real agent
(disk spool, kafka-python producer with acks=all and idempotence) into a local broker.
CPU is this process's CPU time (all its threads, the producer's I/O thread included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import CpuTimer, local_broker, machine, progress, table
from edge_agent.agent import EdgeAgent
from edge_agent.encode import encode_image
from edge_agent.sources import iter_capture
from tilestream import samples
from tilestream.config import AgentSettings
from tilestream.keys import KeyStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=400)
    args = ap.parse_args()
    video = str(samples.path("vtest.avi"))
    n = args.frames
    print(f"machine: {machine()}\n")

    progress(f"capture + encode, {n} frames")
    with CpuTimer() as base:
        done = 0
        for captured in iter_capture(video, loop=True):
            encode_image(captured.image, "jpeg", 80)
            done += 1
            if done >= n:
                break

    with tempfile.TemporaryDirectory() as tmp, local_broker() as broker:
        store = KeyStore(Path(tmp) / "keys")
        store.init_cloud()
        store.enroll("bench-cam")
        settings = AgentSettings(camera_id="bench-cam", source=video, max_frames=n, loop=True, jpeg_quality=80,
                                 drain_timeout_s=120, heartbeat_interval_s=5)
        agent = EdgeAgent(settings, store, broker.bootstrap, 4 * 1024 * 1024, state_dir=Path(tmp) / "agent")
        progress(f"capture + encode + seal + sign + spool + publish, {n} frames")
        with CpuTimer() as full:
            counters = agent.run()
        assert counters.sent == n, counters
        sizes = [p.stat().st_size for p in (Path(tmp) / "agent" / "spool").glob("seg-*")]

    rows = [
        ["capture + encode", n, n / base.wall, base.cpu / n * 1e3, 1.0],
        ["+ seal + sign + spool + publish", n, n / full.wall, full.cpu / n * 1e3, full.cpu / base.cpu],
    ]
    print(table(["pipeline", "frames", "frames/s", "CPU ms/frame", "CPU ratio"], rows))
    extra = (full.cpu / base.cpu - 1) * 100
    print(f"\nsealing, signing, spooling and publishing add {extra:.1f}% CPU over capture+encode "
          f"(goal: at most 10%) — {'met' if extra <= 10 else 'MISSED'}")


if __name__ == "__main__":
    main()
