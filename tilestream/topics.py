"""Topic names and layouts: the one place that says which topics the pipeline uses.

    frames         agent -> processor     sealed frames (tilestream.envelope), key = frame id
    tile-features  processor -> classifier  one TileBatch per frame (or band of tiles), key = frame id
    results        classifier -> anyone   one FrameResult (JSON) per frame, key = camera id
    dead-letters   any stage -> operators  DeadLetter (JSON) with the original record
    heartbeats     agent -> dashboard      AgentHeartbeat JSON, key = camera id
    metrics        stages -> dashboard     StageMetrics JSON snapshots, key = stage/instance
    models         `models publish` -> classifiers  the model registry (compacted), key = model name
    replay-marks   processor -> processor  durable replay marks (compacted, HMAC'd), key = source|partition|band|camera

The frames topic uses ``LogAppendTime``: the broker stamps records with its own clock,
so a camera whose clock is hours off is never rejected by Kafka 4's
``message.timestamp.after.max.ms`` check. The camera's capture time travels inside the
envelope header, which is what latency is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from tilestream.config import KafkaSettings

FRAMES = "frames"
TILE_FEATURES = "tile-features"
TILE_JOBS = "tile-jobs"
RESULTS = "results"
DEAD_LETTERS = "dead-letters"
HEARTBEATS = "heartbeats"
METRICS = "metrics"
MODELS = "models"
REPLAY_MARKS = "replay-marks"
MAX_MODEL_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def pipeline_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """The topics `tilestream kafka start` creates, with partition counts and configs."""
    max_bytes = str(kafka.max_frame_bytes + 64 * 1024)  # room for the envelope header and batch overhead
    return [
        TopicSpec(
            FRAMES,
            kafka.frames_partitions,
            {
                "message.timestamp.type": "LogAppendTime",
                "max.message.bytes": max_bytes,
                "retention.ms": str(24 * 3600 * 1000),
            },
        ),
        TopicSpec(TILE_JOBS, kafka.tile_jobs_partitions,
                  {"max.message.bytes": str(16 * 1024 * 1024), "retention.ms": str(3600 * 1000)}),
        TopicSpec(TILE_FEATURES, kafka.tile_features_partitions, {"retention.ms": str(24 * 3600 * 1000)}),
        TopicSpec(RESULTS, kafka.results_partitions, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
        TopicSpec(DEAD_LETTERS, 1, {"max.message.bytes": max_bytes, "retention.ms": str(7 * 24 * 3600 * 1000)}),
        TopicSpec(HEARTBEATS, 1, {"retention.ms": str(24 * 3600 * 1000)}),
        TopicSpec(METRICS, 1, {"retention.ms": str(24 * 3600 * 1000)}),
        TopicSpec(MODELS, 1, {"cleanup.policy": "compact", "max.message.bytes": str(MAX_MODEL_BYTES)}),
        # One partition: every worker reads all of it anyway. Segments roll every 10 min so the
        # cleaner can compact them, which bounds what a worker reads at startup (stream_processor/replay.py).
        TopicSpec(REPLAY_MARKS, 1, {"cleanup.policy": "compact", "max.message.bytes": str(2 * 1024 * 1024),
                                    "segment.ms": str(600 * 1000), "min.cleanable.dirty.ratio": "0.2"}),
    ]
