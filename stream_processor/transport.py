"""Our Faust transport: aiokafka's, with a Consumer that refuses acks of skipped messages and commits
what was finished before a rebalance forgets it, and an idempotent Producer.

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

import asyncio
import json
import logging

from aiokafka.errors import KafkaTimeoutError
from faust.exceptions import ProducerSendError
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger("tilestream.processor")

# How long the revocation waits for its commit (GuardedConsumer.on_partitions_revoked). A commit
# normally takes a few ms (producer flush + one OffsetCommit); a hung coordinator answers a commit
# only with aiokafka's retries after each 10 s request timeout, and the whole group's rebalance waits
# for this callback. 5 s: half the session timeout; past it the frames are simply read again.
REVOKE_COMMIT_TIMEOUT_S = 5.0


class GuardedConsumer(faust_aiokafka.Consumer):
    refused_acks = 0
    revoke_commits = 0  # commits made by on_partitions_revoked that covered acked offsets

    async def on_partitions_revoked(self, revoked) -> None:  # type: ignore[no-untyped-def]
        """Commit what our agents finished on ``revoked`` *before* Faust forgets it, then Faust's revocation.

        Faust's ``Consumer.on_partitions_revoked`` drops the revoked partitions' acked offsets
        (``_acked``, ``_gap``, ``_committed_offset``) first and only then runs the app's revocation
        (suspend, wait for the agents, commit): that commit finds nothing acked on those partitions
        but what an agent finished after the drop. aiokafka revokes every partition on a rebalance
        (eager protocol), so everything acked since the last periodic commit (``broker_commit_interval``
        1 s) was read again by the partitions' next owners (faust-streaming #502). Measured with
        2 workers, 400 pre-filled frames: 20 and 21 acked-but-uncommitted offsets (3-4 on each of the
        6 partitions) at the start-up rebalance, 17 and 18 frames processed twice (10-18 in 5 runs
        that had a rebalance while processing); with this commit 0 in 7 runs (4 of them checked to
        commit here). tests/test_processor_rebalance.py: 18 of 18 before, 0 after.

        At least once holds: this is Faust's own commit (``Consumer.commit``), which commits only
        contiguous acked offsets above the last commit and flushes the producer first, so an offset is
        committed only after its frame's tile batch and replay mark were handed over and flushed.
        Bounded by :data:`REVOKE_COMMIT_TIMEOUT_S`: the rebalance waits for this callback, and a
        commit to a hung coordinator is abandoned (the frames are then read again, as before).
        """
        if any(self._acked.get(tp) for tp in revoked):
            try:
                done = await asyncio.wait_for(self._commit_now(set(revoked)), REVOKE_COMMIT_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning(json.dumps({"event": "revoke_commit_timeout", "timeout_s": REVOKE_COMMIT_TIMEOUT_S}))
            else:
                self.revoke_commits += bool(done)
        await super().on_partitions_revoked(revoked)

    async def _commit_now(self, tps) -> bool:  # type: ignore[no-untyped-def]
        # Faust's commit() returns without committing when another commit (the periodic one) is
        # under way; that one may not cover the latest acks, so wait for it and commit after it.
        await self.maybe_wait_for_commit_to_finish()
        return await self.commit(tps)

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
