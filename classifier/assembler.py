"""Assembling frames from their tiles (pure; no Kafka).

Tiles of one frame may arrive from several partitions, in any order, and more than once
(at-least-once delivery upstream). :class:`FrameAssembler` keeps the tiles of each pending
frame, says when a frame is complete (all ``n_tiles`` indices present) or timed out, and
remembers recently emitted frames so a redelivered tile never yields a second result.

It also tracks which offsets may be committed: per partition, nothing at or after the
first offset that still belongs to a pending frame, so a crash never loses a tile of a
frame that has not produced its result.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from tilestream.records import TileFeatures


@dataclass
class PendingFrame:
    frame_id: str
    n_tiles: int
    first_seen: float
    tiles: dict[int, TileFeatures] = field(default_factory=dict)
    offsets: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)

    @property
    def complete(self) -> bool:
        return len(self.tiles) == self.n_tiles

    def missing(self) -> list[int]:
        return [i for i in range(self.n_tiles) if i not in self.tiles]


class FrameAssembler:
    def __init__(self, timeout_s: float = 30.0, remember: int = 200_000):
        self.timeout_s = timeout_s
        self.pending: dict[str, PendingFrame] = {}
        self._emitted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember
        self.duplicates = 0
        # Per partition: offsets held by pending frames, and the highest offset seen.
        self._held: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self._seen: dict[int, int] = {}

    def add(self, tile: TileFeatures, partition: int, offset: int, now: float) -> PendingFrame | None:
        """Add one tile; returns the frame when this tile completed it."""
        self.seen(partition, offset)
        if tile.frame_id in self._emitted:
            self.duplicates += 1
            return None
        frame = self.pending.get(tile.frame_id)
        if frame is None:
            frame = self.pending[tile.frame_id] = PendingFrame(tile.frame_id, tile.n_tiles, now)
        if tile.tile_index in frame.tiles:
            self.duplicates += 1
            return None
        frame.tiles[tile.tile_index] = tile
        frame.offsets.append((partition, offset))
        self._held[partition][offset] += 1
        if frame.complete:
            return frame
        return None

    def take_whole(self, frame_id: str, n_tiles: int, partition: int, offset: int) -> bool:
        """A record that carries every tile of a frame none of whose tiles is pending: True when
        the frame is to be answered now, False for a frame answered before (its ``n_tiles`` tiles
        counted as duplicates, as :meth:`add` counts them). A frame taken is remembered as answered
        at once, so a copy of the record later in the same batch is a duplicate too; it holds no
        offset (its answer is sent before the offset can be committed)."""
        self.seen(partition, offset)
        if frame_id in self._emitted:
            self.duplicates += n_tiles
            return False
        self.remember((frame_id,))
        return True

    def seen(self, partition: int, offset: int) -> None:
        """Record that ``offset`` was read (also for records that were dead-lettered)."""
        self._seen[partition] = max(self._seen.get(partition, -1), offset)

    def forget_partitions(self, partitions: set[int]) -> None:
        """After a rebalance took partitions away: drop their pending frames (the new owner re-reads them)."""
        for fid in [f.frame_id for f in self.pending.values() if any(p in partitions for p, _ in f.offsets)]:
            del self.pending[fid]
        for p in partitions:
            self._held.pop(p, None)
            self._seen.pop(p, None)

    def expired(self, now: float) -> list[PendingFrame]:
        return [f for f in self.pending.values() if now - f.first_seen >= self.timeout_s]

    def done(self, frame: PendingFrame) -> None:
        """The frame's result was produced: forget its tiles, remember its id."""
        self.pending.pop(frame.frame_id, None)
        for partition, offset in frame.offsets:
            held = self._held[partition]
            held[offset] -= 1
            if held[offset] <= 0:
                del held[offset]
        self._emitted[frame.frame_id] = None
        while len(self._emitted) > self._remember:
            self._emitted.popitem(last=False)

    def remember(self, frame_ids) -> None:
        """Frames answered elsewhere (before a crash, or by a previous owner of a partition)."""
        for fid in frame_ids:
            self._emitted[fid] = None
        while len(self._emitted) > self._remember:
            self._emitted.popitem(last=False)

    def committable(self) -> dict[int, int]:
        """Per partition, the offset to commit (the next offset to read after a restart)."""
        out = {}
        for partition, last in self._seen.items():
            held = self._held.get(partition)
            out[partition] = min(held) if held else last + 1
        return out
