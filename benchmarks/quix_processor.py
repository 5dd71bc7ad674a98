"""tilestream's processor stage written with Quix Streams (a benchmark peer, not a product).

    python -m benchmarks.quix_processor --bootstrap HOST:PORT --keys DIR --group G

The same per-frame work as `tilestream process` — ``FrameProcessor.process`` (verify, HPKE
open, decode under limits, tile, features, the TileBatch record) and the records' own JSON
serialisation — from `frames` to `tile-features`, key = frame id. What it leaves out, and
the Faust worker does: the replay table, dead letters, metrics and the web page. Runs until
SIGTERM (Quix stops cleanly on it).
"""

from __future__ import annotations

import argparse
import logging


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--keys", required=True)
    ap.add_argument("--group", required=True)
    args = ap.parse_args()

    from quixstreams import Application

    from benchmarks.common import make_processor
    from tilestream import topics
    from tilestream.config import FeatureConfig
    from tilestream.keys import KeyStore

    fp = make_processor(KeyStore(args.keys), FeatureConfig())
    app = Application(broker_address=args.bootstrap, consumer_group=args.group, auto_offset_reset="earliest",
                      loglevel=logging.WARNING, auto_create_topics=False, use_changelog_topics=False,
                      commit_interval=1.0,
                      producer_extra_config={"linger.ms": 5, "acks": "all", "enable.idempotence": True},
                      consumer_extra_config={"fetch.max.bytes": 8 * 1024 * 1024,
                                             "max.partition.fetch.bytes": 8 * 1024 * 1024})
    frames = app.topic(topics.FRAMES, key_deserializer="bytes", value_deserializer="bytes")
    tile_features = app.topic(topics.TILE_FEATURES, key_serializer="bytes", value_serializer="bytes")

    def process(blob: bytes) -> list[bytes]:
        records, _ = fp.process(blob)
        return [r.to_bytes() for r in records]

    sdf = app.dataframe(frames)
    sdf = sdf.apply(process, expand=True)
    sdf.to_topic(tile_features)
    app.run()


if __name__ == "__main__":
    main()
