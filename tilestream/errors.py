"""tilestream's one exception tree: every refusal names exactly one reason.

    TilestreamError                      base of everything tilestream raises on purpose
    ├── ConfigError (ValueError)         a setting or a combination of settings is wrong (file/key named)
    │   └── TileKeyMissing, DashboardError
    ├── Refused                          a record, frame or model was refused; ``reason`` is the code
    │   │                                counted in ``dead_letters_total{reason=...}`` and written
    │   │                                into the dead letter
    │   ├── RecordError, RecordTooLarge  records.py: a record off its contract
    │   ├── EnvelopeError, FrameRejected envelope.py / crypto.py: a frame that does not open
    │   ├── ImageHeaderError             imageinfo.py: an image refused from its header bytes
    │   ├── RegistryRefused              keys.py: a device registry that does not verify
    │   ├── BadMark                      stream_processor/replay.py: a replay mark off its contract
    │   ├── ModelRefused, ModelMismatch  classifier/model.py: a model that is not loaded
    │   ├── SourceError, FrameTooLarge   edge_agent: a camera failure / a frame over the size limit
    │   └── SecurityError                deploy/kafka_security.py: a refused broker-security operation
    └── operational failures             SpoolFull, SpoolLocked (edge_agent/spool.py), SendFailed
                                         (classifier/service.py), KafkaError (deploy/local_kafka.py),
                                         SamplesUnavailable (sampledata)

Classes that were ``ValueError``/``RuntimeError`` before keep that base too, so callers that
caught those still do.

Reason codes are short snake_case words that operators alert on (``malformed``, ``too_large``,
``bad_signature``, ``unknown_key``, ``replay``, ``feature_mismatch``, ``model_refused``, ...);
a stage never invents a reason from an exception's text.
"""

from __future__ import annotations


class TilestreamError(Exception):
    """Base of every error tilestream raises on purpose."""


class ConfigError(TilestreamError, ValueError):
    """Bad configuration: raised before anything runs, naming the file and key."""


class Refused(TilestreamError):
    """Hostile or broken input refused by a stage; ``reason`` is its counted code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
