"""tilestream's processor stage written with Quix Streams (a benchmark peer, not a product).

    python -m benchmarks.quix_processor --bootstrap HOST:PORT --keys DIR --group G

The same per-record work as `tilestream process`: :meth:`ProcessorStage.on_frame` (verify, the
replay check, HPKE open, decode under limits, tile, features, the MACed TileBatch records, dead
letters and replay marks), from `frames` to `tile-features` (key = frame id) through Quix's own
dataframe and sink; the replay marks and dead letters go out through a second Quix producer.
What it leaves out, and the Faust worker does: reading other workers' replay marks, the thread
pool, metrics snapshots and the web page. Runs until SIGTERM (Quix stops cleanly on it).
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

    from quixstreams import Application, message_context

    from benchmarks.common import make_stage
    from tilestream import topics
    from tilestream.config import FeatureConfig
    from tilestream.keys import KeyStore

    stage = make_stage(KeyStore(args.keys), FeatureConfig())
    app = Application(broker_address=args.bootstrap, consumer_group=args.group, auto_offset_reset="earliest",
                      loglevel=logging.WARNING, auto_create_topics=False, use_changelog_topics=False,
                      commit_interval=1.0,
                      producer_extra_config={"linger.ms": 5, "acks": "all", "enable.idempotence": True},
                      consumer_extra_config={"fetch.max.bytes": 8 * 1024 * 1024,
                                             "max.partition.fetch.bytes": 8 * 1024 * 1024})
    frames = app.topic(topics.FRAMES, key_deserializer="bytes", value_deserializer="bytes")
    tile_features = app.topic(topics.TILE_FEATURES, key_serializer="bytes", value_serializer="bytes")
    side = app.get_producer()  # replay marks and dead letters

    def process(blob: bytes, key, timestamp, headers) -> list[bytes]:
        ctx = message_context()
        out = []
        for o in stage.on_frame(blob, ctx.partition, ctx.offset):
            if o.topic == topics.TILE_FEATURES:
                out.append(o.value)  # keyed by the frame id, as the message it came from
            else:
                side.produce(topic=o.topic, key=o.key, value=o.value)
        return out

    sdf = app.dataframe(frames)
    sdf = sdf.apply(process, expand=True, metadata=True)
    sdf.to_topic(tile_features)
    try:
        app.run()
    finally:
        side.flush()


if __name__ == "__main__":
    main()
