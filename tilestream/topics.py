"""Topic names and layouts: the one place that says which topics the pipeline uses.

    frames         agent -> processor     sealed frames (tilestream.envelope), key = frame id
    tile-features  processor -> classifier  one TileBatch per frame (or band of tiles), key = frame id
    results        classifier -> anyone   one FrameResult (JSON) per frame, key = camera id
    dead-letters   any stage -> operators  DeadLetter (JSON) with the original record
    heartbeats     agent -> dashboard      AgentHeartbeat JSON, key = camera id
    metrics        stages -> dashboard     StageMetrics JSON snapshots, key = stage/instance
    models         `models publish` -> classifiers  the model registry (compacted), key = model name

The frames topic uses ``LogAppendTime``: the broker stamps records with its own clock,
so a camera whose clock is hours off is never rejected by Kafka 4's
``message.timestamp.after.max.ms`` check. The camera's capture time travels inside the
envelope header, which is what latency is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from tilestream.config import KafkaSettings

FRAMES = "frames"
TILE_FEATURES = "tile-features"
TILE_JOBS = "tile-jobs"
RESULTS = "results"
DEAD_LETTERS = "dead-letters"
HEARTBEATS = "heartbeats"
METRICS = "metrics"
MODELS = "models"
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
    ]


def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec], replication: int = 1,
                  min_insync_replicas: int | None = None, client_config: dict | None = None) -> list[str]:
    """Create the topics of ``specs`` that do not exist yet; returns the names created.

    ``replication`` copies of each partition; ``min_insync_replicas`` (a topic config, unless a
    spec sets its own) is how many of them an ``acks=all`` write needs: 3 and 2 on a 3-broker
    cluster, so one broker can fail without losing an acknowledged record or stopping writes.
    ``client_config``: kafka-python keyword arguments for a secured cluster (SASL_SSL etc.,
    see ``deploy.local_kafka.LocalKafka.client_config``); they override ``bootstrap``.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import NoError, TopicAlreadyExistsError, for_code

    if replication < 1 or (min_insync_replicas is not None and not 1 <= min_insync_replicas <= replication):
        raise ValueError(f"need 1 <= min.insync.replicas ({min_insync_replicas}) <= replication ({replication})")
    kw = {"bootstrap_servers": bootstrap, **(client_config or {})}
    admin = KafkaAdminClient(**kw, client_id="tilestream-admin", request_timeout_ms=10000)
    created: list[str] = []
    new: list = []
    try:
        existing = set(admin.list_topics())
        for spec in specs:
            if spec.name in existing:
                continue
            configs = dict(spec.configs)
            if min_insync_replicas is not None:
                configs.setdefault("min.insync.replicas", str(min_insync_replicas))
            new.append(NewTopic(spec.name, spec.partitions, replication, topic_configs=configs))
        if new:
            # One request for all: the controller commits them together (one request per
            # topic took 1.5 s each on a 3-node cluster, 12 s for the pipeline's eight).
            # wait_for_metadata: a caller may describe or produce to the topics right away.
            result = admin.create_topics(new, timeout_ms=30000, raise_errors=False, wait_for_metadata=True)
            for t in result["topics"]:
                error = for_code(t["error_code"])
                if error is NoError:
                    created.append(t["name"])
                elif error is not TopicAlreadyExistsError:
                    raise error(f"creating topic {t['name']}: {t.get('error_message') or error.__name__}")
    finally:
        admin.close()
    order = [n.name for n in new]
    return sorted(created, key=order.index)  # in the order of ``specs``
