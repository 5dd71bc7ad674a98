"""Our Faust transport: aiokafka's, with a Consumer that refuses acks of skipped messages and an
idempotent Producer.

Plugged in through Faust's own extension point (``Transport.Consumer``; the app's
``transport`` is set to :class:`Transport` in :func:`stream_processor.app.create_app`),
not by patching Faust.

Why: an at-least-once hole in faust-streaming 0.15.3, found by our SIGKILL/fan-out tests.
During a rebalance Faust suspends flow control; a message its stream takes from the buffer
meanwhile (or one fetched under the previous consumer generation) is *skipped*, never given
to the agent — and yet acknowledged (``faust/streams.py``: ``if event is not None and (do_ack
or value is skipped_value): event.ack()``). Its offset can then be committed, so the frame
is never processed by anyone. We saw it as frames with no tile features and no result after
a rebalance (rarely, under CPU load). ``tests/test_processor_units.py`` pins that line of
Faust, so an upgrade that changes it makes us look again.

:class:`GuardedConsumer` refuses acknowledgements of messages that were not processed under
the current assignment: flow control suspended, or a consumer generation other than the
current one. Such a message stays uncommitted and is delivered again (after the rebalance,
to whoever owns its partition) — at least once, as designed. A message our agent finished
under an old generation is delivered again too: a duplicate, which the downstream
de-duplication absorbs.
"""

from __future__ import annotations

import logging

from aiokafka.errors import KafkaTimeoutError
from faust.exceptions import ProducerSendError
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger("tilestream.processor")


class GuardedConsumer(faust_aiokafka.Consumer):
    refused_acks = 0

    def ack(self, message) -> bool:  # type: ignore[no-untyped-def]
        app = self.app
        generation = getattr(message, "generation_id", None)
        if not app.flow_control.is_active() or (generation is not None and generation != app.consumer_generation_id):
            self.refused_acks += 1
            return False
        return super().ack(message)


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's producer with ``enable_idempotence`` (Faust sets it only inside transactions).

    Why: a produce request to a hung leader is answered by nothing but the request timeout, and
    with Faust's 20-minute one the producer waited for the node to come back: its commit (which
    flushes the producer first) hung 31 s, the whole 30 s freeze, and the processor stalled
    behind it (hung-broker fault test). A shorter request timeout alone would lose records:
    aiokafka fails a batch of a non-idempotent producer once it is older than the request
    timeout, and Faust commits past a failed send. An idempotent aiokafka producer never expires
    a batch: it retries it, with the same sequence numbers, at the partition's new leader, and the
    broker drops a copy it already has (``aiokafka/producer/sender.py`` ``_can_retry``).
    """

    requeued = 0  # records queued again by send() (see there)

    def _settings_extra(self):  # type: ignore[no-untyped-def]
        return {"acks": "all", "enable_idempotence": True, **super()._settings_extra()}

    async def send(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Faust's send, which waits (again) instead of failing when the record could not be
        *queued* within the request timeout: aiokafka raises KafkaTimeoutError from
        ``send()`` only before the record is appended (a full batch of a partition whose
        request is still out to a hung leader, or no metadata for the topic), so queueing it
        again cannot write it twice. With the 20-minute timeout this wait was simply longer;
        with 10 s it surfaced as ProducerSendError in the agent, which lost the frame's ack."""
        while True:
            try:
                return await super().send(*args, **kwargs)
            except ProducerSendError as exc:
                if not isinstance(exc.__cause__, KafkaTimeoutError) or self._closed_for_send():
                    raise
                self.requeued += 1
                log.warning("producer: record not queued within the request timeout (a hung leader?); queueing again")

    def _closed_for_send(self) -> bool:
        return bool(getattr(self, "_shutdown_initiated", False) or self.should_stop)


class Transport(faust_aiokafka.Transport):
    Consumer = GuardedConsumer
    Producer = IdempotentProducer


def install(app) -> Transport:
    """Give ``app`` our transport (before the app starts; Faust builds its consumer from it)."""
    app.transport = Transport(app.conf.broker_consumer, app)
    return app.transport
