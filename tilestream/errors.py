"""tilestream's one exception tree: every refusal names exactly one reason.

    TilestreamError                      base of everything tilestream raises on purpose
    ├── ConfigError (ValueError)         a setting or a combination of settings is wrong (file/key named)
    └── Refused                          a record, frame or model was refused; ``reason`` is the code
                                         counted in ``dead_letters_total{reason=...}`` and written
                                         into the dead letter

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
