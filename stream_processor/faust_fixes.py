"""A guard for an at-least-once hole in faust-streaming 0.15.3, found by our SIGKILL/fan-out tests.

During a rebalance Faust suspends flow control; a message its stream takes from the buffer
meanwhile (or one fetched under the previous consumer generation) is *skipped*, never given
to the agent — and yet acknowledged (``faust/streams.py``: ``if event is not None and (do_ack
or value is skipped_value): event.ack()``). Its offset can then be committed, so the frame
is never processed by anyone. We saw it as frames with no tile features and no result after
a rebalance (rarely, under CPU load).

The guard refuses, at the single choke point ``Consumer.ack``, acknowledgements of messages
that were not processed under the current assignment: flow control suspended, or a consumer
generation other than the current one. Such a message stays uncommitted and is delivered
again (after the rebalance, to whoever owns its partition) — at least once, as designed.
A message our agent finished under an old generation is delivered again too: a duplicate,
which the downstream de-duplication absorbs.
"""

from __future__ import annotations

import logging

from faust.transport.consumer import Consumer

log = logging.getLogger("tilestream.processor")
_installed = False


def install_rebalance_ack_guard() -> None:
    global _installed
    if _installed:
        return
    original_ack = Consumer.ack

    def ack(self, message) -> bool:  # type: ignore[no-untyped-def]
        app = self.app
        generation = getattr(message, "generation_id", None)
        if not app.flow_control.is_active() or (generation is not None and generation != app.consumer_generation_id):
            refused = getattr(app, "tilestream_refused_acks", 0) + 1
            app.tilestream_refused_acks = refused
            return False
        return original_ack(self, message)

    Consumer.ack = ack  # type: ignore[method-assign]
    _installed = True
