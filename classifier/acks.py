"""Which ``tile-features`` offsets may be committed, given which outputs Kafka acknowledged (pure).

The classifier does not wait for a poll's results to be acknowledged before it polls again (a
wait of one produce round trip per poll, ~4 ms per loop at camera rates): results of several
polls may be in flight at once. Each poll is one *batch* here: the outputs it made (results,
dead letters) and the offsets the assembler said were committable right after it
(``FrameAssembler.committable``). A batch's offsets become safe once every output of that
batch *and of every batch before it* was acknowledged, so the committed offset never passes a
result or dead letter Kafka does not hold: a crash re-reads and answers again (the read-back of
answered frames drops what was answered), it never loses a frame.

Per partition the assembler's committable offset only grows while the partition stays
assigned, so the newest safe batch's offsets are the ones to commit; on revocation the
partitions that went away are dropped from every batch (:meth:`AckedOffsets.forget`), so an
offset read under an earlier assignment is never committed under a later one.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass
class Batch:
    """One poll's outputs still unacknowledged (``remaining``) and the offsets they guard."""

    remaining: int
    offsets: dict[int, int]


class AckedOffsets:
    def __init__(self) -> None:
        self._batches: collections.deque[Batch] = collections.deque()
        self.safe: dict[int, int] = {}  # partition -> offset to commit (next to read)
        self.unacked = 0  # outputs sent and not yet acknowledged, all batches

    def add(self, outputs: int, offsets: dict[int, int]) -> Batch:
        """A poll made ``outputs`` records to send; ``offsets`` is committable once they are acked.

        A poll with nothing to send behind one still waiting becomes safe exactly when that one
        does, so its offsets replace that one's (every partition's offset only grows) instead of
        queueing: an idle loop (5 polls a second) adds no batch while a leader is away."""
        if outputs == 0 and self._batches:
            b = self._batches[-1]
            b.offsets.update(offsets)
            return b
        b = Batch(outputs, dict(offsets))
        self._batches.append(b)
        self.unacked += outputs
        self._advance()
        return b

    def acked(self, batch: Batch) -> None:
        """Kafka acknowledged one output of ``batch``."""
        if batch.remaining <= 0:
            raise ValueError("more acknowledgements than outputs in a batch")
        batch.remaining -= 1
        self.unacked -= 1
        self._advance()

    def _advance(self) -> None:
        while self._batches and self._batches[0].remaining == 0:
            self.safe.update(self._batches.popleft().offsets)

    def forget(self, partitions: set[int]) -> None:
        """Partitions taken away by a rebalance: never commit an offset of theirs from before it."""
        for p in partitions:
            self.safe.pop(p, None)
        for b in self._batches:
            for p in partitions:
                b.offsets.pop(p, None)

    @property
    def batches_waiting(self) -> int:
        return len(self._batches)
