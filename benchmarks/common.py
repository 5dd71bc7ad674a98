"""Shared benchmark helpers: machine description, tables, a throw-away local broker, progress."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence


def machine() -> str:
    import cv2
    import numpy as np
    import sklearn

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gib:.1f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, OpenCV {cv2.__version__}, "
            f"scikit-learn {sklearn.__version__}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def local_broker(version: str | None = None) -> Iterator["object"]:
    """A real Apache Kafka on free loopback ports for the duration of a benchmark."""
    from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, free_port
    from tilestream.config import KafkaSettings
    from tilestream.topics import pipeline_topics

    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp:
        lk = LocalKafka(version or DEFAULT_VERSION, "127.0.0.1", free_port(), free_port(), state_dir=tmp, progress=progress)
        try:
            lk.start(pipeline_topics(KafkaSettings()))
            yield lk
        finally:
            lk.stop()


class CpuTimer:
    """Wall and process CPU time (all threads of this process) of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
