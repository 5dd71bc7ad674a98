"""Pure parts of the processor: image-header limits (decompression bombs), the Faust ack guard.

Replay memory: tests/test_replay.py."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from tilestream.imageinfo import ImageHeaderError, probe
from stream_processor.pipeline import decode_image
from tilestream.crypto import FrameRejected
from tilestream.envelope import FrameHeader


def header(w: int, h: int, enc: str = "png") -> FrameHeader:
    return FrameHeader("cam", 1, 1, w, h, enc, b"c" * 8, b"d" * 8)


@pytest.mark.parametrize("ext, fmt", [(".jpg", "jpeg"), (".png", "png"), (".webp", "webp")])
def test_probe_reads_the_size_from_the_header(ext, fmt):
    ok, buf = cv2.imencode(ext, np.zeros((37, 53, 3), np.uint8))
    assert probe(buf.tobytes()) == (fmt, 53, 37)


def test_probe_refuses_what_is_not_an_image():
    for data in (b"", b"GIF89a....", b"\xff\xd8\xff\xda\x00\x02"):
        with pytest.raises(ImageHeaderError):
            probe(data)


def test_a_decompression_bomb_is_refused_before_decoding():
    """A 30 KB PNG that declares 20000 x 20000 pixels (400 MB) is refused from its header."""
    raw = zlib.compress(b"\x00" * (20001 * 200), 9)  # real zlib data; the image itself is never decoded

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    assert len(bomb) < 64 * 1024
    with pytest.raises(FrameRejected) as exc:
        decode_image(bomb, header(20000, 20000), max_bytes=4 << 20, max_pixels=40_000_000)
    assert exc.value.reason == "too_large" and "20000x20000" in str(exc.value)


def test_an_image_that_lies_about_its_size_or_kind_is_bad():
    ok, buf = cv2.imencode(".png", np.zeros((10, 10), np.uint8))
    with pytest.raises(FrameRejected) as exc:
        decode_image(buf.tobytes(), header(640, 480), 4 << 20, 40_000_000)
    assert exc.value.reason == "bad_image"
    with pytest.raises(FrameRejected) as exc:
        decode_image(buf.tobytes(), header(10, 10, "jpeg"), 4 << 20, 40_000_000)
    assert exc.value.reason == "bad_image"
    truncated = buf.tobytes()[:-30]
    with pytest.raises(FrameRejected) as exc:
        decode_image(truncated, header(10, 10), 4 << 20, 40_000_000)
    assert exc.value.reason == "bad_image"
    assert decode_image(buf.tobytes(), header(10, 10), 4 << 20, 40_000_000).shape == (10, 10)


def test_the_faust_ack_hole_our_transport_guards_is_still_there_and_the_guard_is_plugged_in(tmp_path):
    """Pins the Faust behaviour stream_processor/transport.py relies on: skipped values are acked
    (faust/streams.py). If an upgrade removes that line, this fails and the guard can go."""
    import inspect

    import faust.streams

    from stream_processor import transport

    assert "do_ack or value is skipped_value" in inspect.getsource(faust.streams)
    app = faust.App("pin-test", broker="kafka://127.0.0.1:1", datadir=str(tmp_path), web_enabled=False)
    transport.install(app)
    assert app.transport.Consumer is transport.GuardedConsumer
    assert issubclass(transport.GuardedConsumer, faust.transport.drivers.aiokafka.Consumer)

    class FlowControl:
        active = True

        def is_active(self):
            return self.active

    class FakeApp:  # the two attributes GuardedConsumer.ack reads
        flow_control = FlowControl()
        consumer_generation_id = 7

    class Message:
        generation_id = 6

    consumer = transport.GuardedConsumer.__new__(transport.GuardedConsumer)
    consumer.app = FakeApp()
    assert consumer.ack(Message()) is False and consumer.refused_acks == 1  # another generation
    FakeApp.flow_control.active = False
    Message.generation_id = 7
    assert consumer.ack(Message()) is False and consumer.refused_acks == 2  # during a rebalance


def test_faust_still_forgets_revoked_acks_before_its_revocation_commit():
    """Pins what GuardedConsumer.on_partitions_revoked works around (faust/transport/consumer.py): the
    revoked partitions' acked offsets are dropped before the app's revocation (which commits) runs, and
    Faust's commit takes only contiguous acks above the last commit and flushes the producer first
    (the at-least-once our early commit relies on). If an upgrade changes either, look again."""
    import inspect

    from faust.transport.consumer import Consumer

    from stream_processor import transport

    revoked = inspect.getsource(Consumer.on_partitions_revoked)
    assert revoked.index("self._acked.pop(tp, None)") < revoked.index("await T(self._on_partitions_revoked")
    assert "if min(acked) - committed_offset > 1:" in inspect.getsource(Consumer._new_offset)
    commit = inspect.getsource(Consumer._commit_offsets)
    assert commit.index("await self.app.producer.flush()") < commit.index("did_commit = await self._commit(")
    assert "on_partitions_revoked" in vars(transport.GuardedConsumer)


def test_the_faust_producer_is_idempotent_and_requeues_only_what_was_never_queued(tmp_path):
    """Pins what stream_processor/transport.py's IdempotentProducer relies on: Faust wraps a
    KafkaError of aiokafka's send() in ProducerSendError ``from`` it, and aiokafka retries (never
    expires) batches of an idempotent producer, so a 10 s request timeout loses nothing."""
    import inspect

    import aiokafka.producer.sender
    import faust
    import faust.transport.drivers.aiokafka as faust_aiokafka

    from stream_processor import transport

    assert 'raise ProducerSendError(f"Error while sending: {exc!r}") from exc' in inspect.getsource(
        faust_aiokafka.Producer.send)
    assert "if self._sender._txn_manager is None and batch.expired():" in inspect.getsource(
        aiokafka.producer.sender.SendProduceReqHandler._can_retry)
    app = faust.App("pin-producer", broker="kafka://127.0.0.1:1", datadir=str(tmp_path), web_enabled=False,
                    producer_request_timeout=10.0)
    transport.install(app)
    assert app.transport.Producer is transport.IdempotentProducer
    producer = app.transport.create_producer()
    assert isinstance(producer, transport.IdempotentProducer)
    assert producer._settings_extra()["enable_idempotence"] is True
    assert producer._settings_default()["request_timeout_ms"] == 10000


def test_faust_consumer_runs_in_its_own_thread_so_an_inline_frame_does_not_hold_its_heartbeats():
    """stream_processor.app.INLINE_MAX_PIXELS rests on this: Faust's aiokafka consumer (fetches,
    heartbeats, the group coordinator) lives in a thread with its own event loop, not on the loop
    our agent computes on. A Faust upgrade that moves it onto the app's loop makes us look again."""
    from faust.transport.consumer import ThreadDelegateConsumer
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from stream_processor.transport import GuardedConsumer

    assert issubclass(GuardedConsumer, ThreadDelegateConsumer)
    assert issubclass(faust_aiokafka.AIOKafkaConsumerThread, faust_aiokafka.ConsumerThread)


def test_an_inline_step_lets_the_loop_turn_first_and_a_large_or_unknown_one_goes_to_the_pool():
    """stream_processor.app.run_step: the producer's sender task and the timers live on the
    agent's loop; an inline step that never yielded starved them while frames were buffered."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from stream_processor.app import INLINE_MAX_PIXELS, run_step

    async def main():
        seen = []
        where = lambda: (threading.current_thread().name, list(seen))  # noqa: E731
        other = asyncio.get_running_loop().call_soon(seen.append, "other callback")
        with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
            small = await run_step(pool, where, pixels=INLINE_MAX_PIXELS)
            large = await run_step(pool, where, pixels=INLINE_MAX_PIXELS + 1)
            unknown = await run_step(pool, where)
        del other
        return small, large, unknown

    small, large, unknown = asyncio.run(main())
    assert small == (threading.current_thread().name, ["other callback"])  # inline, after the loop turned
    assert large[0].startswith("pool") and unknown[0].startswith("pool")


def test_an_inline_step_waits_for_a_three_turn_wake_up_chain_like_the_producers_send():
    """aiokafka's producer needs three loop turns from send() to the bytes on the socket (waiter ->
    asyncio.wait -> sender task -> produce task): an inline frame must not start before the chain
    of the previous frame's send ran out, or those tile records wait for the whole frame."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from stream_processor.app import INLINE_MAX_PIXELS, INLINE_TURNS, run_step

    async def main():
        loop = asyncio.get_running_loop()
        steps = []

        def link(n):
            steps.append(n)
            if n < 3:
                loop.call_soon(link, n + 1)

        loop.call_soon(link, 1)  # the chain a send() starts
        with ThreadPoolExecutor(1) as pool:
            return await run_step(pool, lambda: list(steps), pixels=INLINE_MAX_PIXELS)

    assert INLINE_TURNS >= 3
    assert asyncio.run(main()) == [1, 2, 3]
