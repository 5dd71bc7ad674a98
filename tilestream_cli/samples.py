"""``tilestream samples fetch``: OpenCV's sample data from Debian's opencv-doc."""

from __future__ import annotations

import argparse
import sys
from tilestream.config import Settings



def cmd_samples(args: argparse.Namespace, settings: Settings) -> int:
    import sampledata as samples

    try:
        for name, path in samples.fetch(progress=lambda m: print(m, file=sys.stderr)).items():
            print(f"{name}\t{path}")
    except samples.SamplesUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    s = sub.add_parser("samples", help="OpenCV sample data (vtest.avi, digits.png)")
    s.add_argument("action", choices=["fetch"])
    s.set_defaults(func=cmd_samples)
