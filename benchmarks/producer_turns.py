"""python -m benchmarks.producer_turns

How many loop turns an aiokafka producer needs between send() and the request on the wire:
send one record, give the loop N turns (sleep(0)), then block the loop 60 ms (an inline frame),
and compare the record's LogAppendTime with the send time."""
import asyncio
import time

from aiokafka import AIOKafkaProducer

from benchmarks.common import local_broker
from kafkaio.clients import ensure_topics
from tilestream.topics import TopicSpec

async def main(bootstrap):
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0)
    await p.start()
    try:
        for _ in range(5):
            await (await p.send("turns", b"x" * 37000))
        for turns in (1, 2, 3, 4, 5, 6, 8):
            delays = []
            for rep in range(8):
                await asyncio.sleep(0.05)
                t0 = time.time()
                fut = await p.send("turns", b"x" * 37000)
                for _ in range(turns):
                    await asyncio.sleep(0)
                time.sleep(0.06)  # the loop blocked by an inline frame
                md = await fut
                delays.append(md.timestamp - t0 * 1000)
            print(f"turns {turns}: send -> broker append ms", sorted(round(d) for d in delays), flush=True)
    finally:
        await p.stop()

if __name__ == "__main__":
    with local_broker() as lk:
        ensure_topics(lk.bootstrap, [TopicSpec("turns", 1, {"message.timestamp.type": "LogAppendTime"})])
        asyncio.run(main(lk.bootstrap))
