"""Pure aggregation behind the dashboard: records in, one JSON-able snapshot out.

No I/O and no clock of its own: every ``add_*`` takes the time the record was *seen*
(``seen_at``, seconds since the epoch) and :meth:`DashboardState.snapshot` takes ``now``, so
the whole module is unit-tested with hand-made records and a hand-made clock.

What is aggregated (see :meth:`DashboardState.snapshot` for the exact shape):

* per camera, from ``results``: last label and its probability, the last frame's tile labels
  as a small grid (positions from :class:`~tilestream.records.TileLabel` x/y), results per
  second over ``rate_window_s``, capture-to-result latency p50/p95/p99 over
  ``latency_window_s``; from ``heartbeats``: online/offline (offline when no heartbeat for
  ``heartbeat_misses`` x its ``interval_s``; a camera is also online while results arrive),
  spool depth, frames skipped/dropped and the other agent counters;
* per stage, from ``metrics`` (:class:`~tilestream.records.StageMetrics`): rates and latencies
  summed/listed over the instances that are still reporting, consumer lag per group and
  partition;
* dead letters by reason, in per-minute buckets, and the most recent ones (never the
  original record: it is not needed and it is not ours to show);
* a pipeline-wide latency histogram and quantiles, the model(s) in use.

Bounded whatever the input: records arrive already checked (dashboard.feed), and the state adds
its own caps — cameras, stage instances, models, dead-letter reasons, a tile grid's cells — and a
byte budget for the whole snapshot (``max_snapshot_bytes``): when the JSON of the cameras, stage
instances or lag rows would not fit, the rest of them is left out of that snapshot and counted
under ``totals.omitted`` (the totals still count every camera). Without it, one forged result
of 10,000 tiles at distinct positions made a 225 MB snapshot.

Quantiles are nearest-rank (``sorted[ceil(q * n) - 1]``): of 1..100 ms, p50 is 50, p95 is 95,
p99 is 99 — exact values that were observed, never interpolated.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from tilestream.records import AgentHeartbeat, DeadLetter, FrameResult, StageMetrics, TileLabel

# Upper bounds (ms) of the latency histogram's buckets; one more bucket holds everything above.
LATENCY_BUCKETS_MS: tuple[float, ...] = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
# Cell codes of the tile grid: one character per tile, an index into the grid's own label list.
_CODES = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DEFAULT_INTERVAL_S = 5.0


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted, non-empty list."""
    n = len(sorted_values)
    return sorted_values[min(n - 1, max(0, math.ceil(q * n) - 1))]


def quantiles(values: Iterable[float]) -> dict[str, float] | None:
    data = sorted(values)
    if not data:
        return None
    return {name: round(quantile(data, q), 3) for name, q in QUANTILES}


def latency_bucket(latency_ms: float) -> int:
    for i, bound in enumerate(LATENCY_BUCKETS_MS):
        if latency_ms <= bound:
            return i
    return len(LATENCY_BUCKETS_MS)


def tile_grid(tiles: list[TileLabel], max_cells: int = 16_384) -> dict[str, Any] | None:
    """The tiles of one frame as a compact grid: columns/rows from the distinct x/y positions.

    ``cells`` has ``rows * cols`` characters, row by row; each is an index (``_CODES``) into
    ``labels``, or ``.`` where no tile sits (a missing tile of an incomplete frame). ``labels``
    lists at most len(_CODES) labels (the others are ``?``); a grid of more than ``max_cells``
    cells is not drawn (None).
    """
    if not tiles:
        return None
    xs = sorted({t.x for t in tiles})
    ys = sorted({t.y for t in tiles})
    if len(xs) * len(ys) > max_cells:
        return None
    col = {x: i for i, x in enumerate(xs)}
    row = {y: i for i, y in enumerate(ys)}
    labels = sorted({t.label for t in tiles})
    code = {label: (_CODES[i] if i < len(_CODES) else "?") for i, label in enumerate(labels)}
    labels = labels[:len(_CODES)]
    cells = ["."] * (len(xs) * len(ys))
    for t in tiles:
        cells[row[t.y] * len(xs) + col[t.x]] = code[t.label]
    return {
        "cols": len(xs),
        "rows": len(ys),
        "labels": labels,
        "cells": "".join(cells),
        "width": max(t.x + t.w for t in tiles),
        "height": max(t.y + t.h for t in tiles),
    }


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (how the server sends it)."""
    return len(json.dumps(value, separators=(",", ":")))


def fit(items: list, budget: int) -> tuple[list, int]:
    """The longest prefix of ``items`` whose compact JSON fits in ``budget`` bytes, and its size."""
    out, used = [], 0
    for item in items:
        n = json_size(item) + 1  # and a comma
        if used + n > budget:
            break
        out.append(item)
        used += n
    return out, used


def camera_of(frame_id: str | None) -> str | None:
    """``camera/seq`` -> ``camera`` (frame ids are built by tilestream.envelope.frame_id)."""
    if not frame_id or "/" not in frame_id:
        return None
    return frame_id.rsplit("/", 1)[0] or None


@dataclass
class StateConfig:
    latency_window_s: float = 60.0  # per-camera and pipeline latency quantiles and histogram
    rate_window_s: float = 10.0  # frames/s
    heartbeat_misses: float = 3.0  # offline after this many heartbeat intervals without one
    result_timeout_s: float = 10.0  # a camera without heartbeats is online while results came within this
    dead_letter_minutes: int = 30  # per-minute buckets kept and shown
    recent_dead_letters: int = 25
    max_reasons: int = 50  # distinct dead-letter reasons tracked; more are counted as "other"
    max_cameras: int = 2000  # a flood of made-up camera ids cannot exhaust memory
    max_samples_per_camera: int = 6000  # latency samples kept per camera (100 fps for a minute)
    max_samples_total: int = 50_000  # pipeline-wide latency samples kept
    forget_camera_after_s: float = 3600.0
    forget_stage_after_s: float = 600.0
    max_stages: int = 256  # (stage, instance) pairs tracked; reports of more are counted, not kept
    max_models: int = 64  # (model id, version) pairs tracked
    max_grid_cells: int = 16_384  # a tile grid larger than this is not drawn
    max_lag_rows: int = 1000  # consumer-lag rows in one snapshot
    max_snapshot_bytes: int = 4 * 1024 * 1024  # JSON budget of one snapshot (100 busy cameras: ~150 KB)


@dataclass
class _Camera:
    id: str
    first_seen: float
    frames: int = 0
    incomplete: int = 0
    dead_letters: int = 0
    last_result: FrameResult | None = None
    last_result_at: float | None = None
    heartbeat: AgentHeartbeat | None = None
    heartbeat_at: float | None = None
    samples: collections.deque = field(default_factory=collections.deque)  # (seen_at, latency_ms)
    _q_key: Any = None
    _q: dict[str, float] | None = None
    _grid_key: Any = None
    _grid: dict[str, Any] | None = None

    def last_activity(self) -> float:
        return max(t for t in (self.first_seen, self.last_result_at, self.heartbeat_at) if t is not None)


@dataclass
class _Model:
    model_id: str
    model_version: int
    frames: int = 0
    last_seen: float = 0.0


class DashboardState:
    """Everything the dashboard shows, aggregated from records; snapshot() renders it."""

    def __init__(self, config: StateConfig | None = None):
        self.config = config or StateConfig()
        self.cameras: dict[str, _Camera] = {}
        self.cameras_refused = 0  # results/heartbeats of new cameras beyond max_cameras
        self.stages_refused = 0  # metrics of new stage instances beyond max_stages
        self.stages: dict[tuple[str, str], tuple[StageMetrics, float]] = {}
        self.models: dict[tuple[str, int], _Model] = {}
        self.results_total = 0
        self._results_per_s: dict[int, int] = collections.defaultdict(int)  # whole second -> results
        self._samples: collections.deque = collections.deque()  # (seen_at, latency_ms, bucket)
        self._histogram = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._global_q_key: Any = None
        self._global_q: dict[str, float] | None = None
        self.dead_letters_total = 0
        self.dead_by_reason: collections.Counter[str] = collections.Counter()
        self._dead_minutes: dict[int, collections.Counter[str]] = {}
        self._dead_recent: collections.deque = collections.deque(maxlen=self.config.recent_dead_letters)
        self._first_seen: float | None = None

    # -- input -------------------------------------------------------------------------
    def _camera(self, camera_id: str, seen_at: float) -> _Camera | None:
        cam = self.cameras.get(camera_id)
        if cam is None:
            if len(self.cameras) >= self.config.max_cameras:
                self.cameras_refused += 1
                return None
            cam = self.cameras[camera_id] = _Camera(camera_id, seen_at)
        else:
            cam.first_seen = min(cam.first_seen, seen_at)
        return cam

    def _seen(self, seen_at: float) -> None:
        self._first_seen = seen_at if self._first_seen is None else min(self._first_seen, seen_at)

    def add_result(self, r: FrameResult, seen_at: float) -> None:
        cam = self._camera(r.camera_id, seen_at)
        if cam is None:
            return
        self._seen(seen_at)
        cam.frames += 1
        if not r.complete:
            cam.incomplete += 1
        if cam.last_result_at is None or seen_at >= cam.last_result_at:
            cam.last_result, cam.last_result_at = r, seen_at
        cfg = self.config
        cam.samples.append((seen_at, float(r.latency_ms)))
        if len(cam.samples) > cfg.max_samples_per_camera:
            cam.samples.popleft()
        bucket = latency_bucket(float(r.latency_ms))
        self._samples.append((seen_at, float(r.latency_ms), bucket))
        self._histogram[bucket] += 1
        if len(self._samples) > cfg.max_samples_total:
            self._histogram[self._samples.popleft()[2]] -= 1
        self._global_q_key = None
        self.results_total += 1
        self._results_per_s[int(seen_at)] += 1
        key = (r.model_id, int(r.model_version))
        model = self.models.get(key)
        if model is None:
            if len(self.models) >= cfg.max_models:  # forget the model seen longest ago
                del self.models[min(self.models, key=lambda k: self.models[k].last_seen)]
            model = self.models[key] = _Model(r.model_id, int(r.model_version))
        model.frames += 1
        model.last_seen = max(model.last_seen, seen_at)

    def add_heartbeat(self, hb: AgentHeartbeat, seen_at: float) -> None:
        cam = self._camera(hb.camera_id, seen_at)
        if cam is None:
            return
        self._seen(seen_at)
        if cam.heartbeat_at is None or seen_at >= cam.heartbeat_at:
            cam.heartbeat, cam.heartbeat_at = hb, seen_at

    def add_dead_letter(self, dl: DeadLetter, seen_at: float) -> None:
        self._seen(seen_at)
        cfg = self.config
        reason = dl.reason if (dl.reason in self.dead_by_reason or len(self.dead_by_reason) < cfg.max_reasons) else "other"
        self.dead_letters_total += 1
        self.dead_by_reason[reason] += 1
        minute = int(seen_at // 60) * 60
        self._dead_minutes.setdefault(minute, collections.Counter())[reason] += 1
        camera = camera_of(dl.frame_id)
        if camera is not None and camera in self.cameras:
            self.cameras[camera].dead_letters += 1
        self._dead_recent.append({
            "seen_at": round(seen_at, 3),
            "at_ns": dl.at_ns,
            "stage": dl.stage,
            "reason": reason,
            "frame_id": dl.frame_id,
            "camera_id": camera,
            "message": (dl.message or "")[:200],
            "source": f"{dl.source_topic}/{dl.source_partition}@{dl.source_offset}" if dl.source_topic else None,
        })

    def add_stage_metrics(self, m: StageMetrics, seen_at: float) -> None:
        self._seen(seen_at)
        key = (m.stage, m.instance)
        old = self.stages.get(key)
        if old is None and len(self.stages) >= self.config.max_stages:
            self.stages_refused += 1
            return
        if old is None or seen_at >= old[1]:
            self.stages[key] = (m, seen_at)

    # -- derived -----------------------------------------------------------------------
    def _heartbeat_timeout(self, hb: AgentHeartbeat) -> float:
        interval = hb.interval_s if hb.interval_s and hb.interval_s > 0 else _DEFAULT_INTERVAL_S
        return self.config.heartbeat_misses * interval

    def camera_status(self, cam: _Camera, now: float) -> str:
        """``online``, ``offline`` or ``stopped`` (the agent said it was stopping and no results came since)."""
        hb = cam.heartbeat
        if hb is not None:
            timeout = self._heartbeat_timeout(hb)
            if hb.status != "stopping" and cam.heartbeat_at is not None and now - cam.heartbeat_at <= timeout:
                return "online"
        else:
            timeout = self.config.result_timeout_s
        if cam.last_result_at is not None and now - cam.last_result_at <= timeout:
            return "online"
        if hb is not None and hb.status == "stopping":
            return "stopped"
        return "offline"

    def _prune(self, now: float) -> None:
        cfg = self.config
        cutoff = now - cfg.latency_window_s
        for cam in self.cameras.values():
            while cam.samples and cam.samples[0][0] < cutoff:
                cam.samples.popleft()
        while self._samples and self._samples[0][0] < cutoff:
            self._histogram[self._samples.popleft()[2]] -= 1
            self._global_q_key = None
        for sec in [s for s in self._results_per_s if s < now - max(cfg.rate_window_s, 60)]:
            del self._results_per_s[sec]
        first_minute = int(now // 60) * 60 - (cfg.dead_letter_minutes - 1) * 60
        for minute in [m for m in self._dead_minutes if m < first_minute]:
            del self._dead_minutes[minute]
        for cid in [c for c, cam in self.cameras.items() if now - cam.last_activity() > cfg.forget_camera_after_s]:
            del self.cameras[cid]
        for key in [k for k, (_m, at) in self.stages.items() if now - at > cfg.forget_stage_after_s]:
            del self.stages[key]

    def _rate_divisor(self, first_seen: float, now: float) -> float:
        return min(self.config.rate_window_s, max(1.0, now - first_seen))

    def _camera_view(self, cam: _Camera, now: float) -> dict[str, Any]:
        cfg = self.config
        q_key = (len(cam.samples), cam.samples[-1] if cam.samples else None, cam.samples[0] if cam.samples else None)
        if q_key != cam._q_key:
            cam._q_key, cam._q = q_key, quantiles(lat for _t, lat in cam.samples)
        recent = 0
        for t, _lat in reversed(cam.samples):  # newest first: stop at the window's start
            if t <= now - cfg.rate_window_s:
                break
            recent += 1
        r = cam.last_result
        view: dict[str, Any] = {
            "id": cam.id,
            "status": self.camera_status(cam, now),
            "frames": cam.frames,
            "incomplete": cam.incomplete,
            "dead_letters": cam.dead_letters,
            "fps": round(recent / self._rate_divisor(cam.first_seen, now), 2),
            "latency": cam._q,
            "latency_n": len(cam.samples),
            "last_result_age_s": None if cam.last_result_at is None else round(max(0.0, now - cam.last_result_at), 1),
        }
        if r is not None:
            if cam._grid_key is not r:
                cam._grid_key, cam._grid = r, tile_grid(r.tiles, cfg.max_grid_cells)
            view.update({
                "seq": r.seq,
                "label": r.label,
                "p": round(float(r.probabilities.get(r.label, 0.0)), 4),
                "latency_ms": round(float(r.latency_ms), 1),
                "complete": r.complete,
                "missing_tiles": len(r.missing_tiles),
                "model": f"{r.model_id}:v{r.model_version}",
                "tiles": cam._grid,
            })
        hb = cam.heartbeat
        if hb is not None:
            counters = hb.counters or {}
            view["agent"] = {
                "version": hb.agent_version,
                "status": hb.status,
                "interval_s": hb.interval_s,
                "timeout_s": self._heartbeat_timeout(hb),
                "age_s": round(max(0.0, now - (cam.heartbeat_at or now)), 1),
                "fps": round(float(hb.fps), 2),
                "spool_frames": hb.spool_frames,
                "spool_bytes": hb.spool_bytes,
                "skipped": int(counters.get("skipped", 0)),
                "dropped": int(counters.get("dropped", 0)),
                "counters": {k: counters[k] for k in sorted(counters)},
            }
        return view

    def _stages_view(self, now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
        by_stage: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        lag: dict[tuple[str, str, int], dict[str, Any]] = {}
        for (stage, instance), (m, seen_at) in sorted(self.stages.items()):
            interval = m.interval_s if m.interval_s and m.interval_s > 0 else _DEFAULT_INTERVAL_S
            fresh = now - seen_at <= self.config.heartbeat_misses * interval
            by_stage[stage].append({
                "instance": instance,
                "fresh": fresh,
                "age_s": round(max(0.0, now - seen_at), 1),
                "rates": {k: round(float(v), 3) for k, v in sorted(m.rates.items())},
                "latency_ms": m.latency_ms,
                "group": m.group,
                "extra": {k: v for k, v in sorted(m.extra.items()) if isinstance(v, (str, int, float, bool))},
            })
            if not fresh:
                continue
            group = m.group or stage
            for where, value in m.consumer_lag.items():
                topic, _, part = where.rpartition("/")
                try:
                    partition = int(part)
                except ValueError:
                    topic, partition = where, -1
                key = (group, topic, partition)
                if key not in lag or seen_at >= lag[key]["_at"]:
                    lag[key] = {"group": group, "topic": topic, "partition": partition, "lag": int(value),
                                "instance": instance, "_at": seen_at}
        stages = []
        for stage, instances in sorted(by_stage.items()):
            rates: dict[str, float] = collections.defaultdict(float)
            for inst in instances:
                if inst["fresh"]:
                    for k, v in inst["rates"].items():
                        rates[k] += v
            stages.append({
                "stage": stage,
                "instances": instances,
                "fresh": sum(1 for i in instances if i["fresh"]),
                # a flood of made-up rate names over many instances must not make the sum huge
                "rates": {k: round(v, 3) for k, v in sorted(rates.items())[:64]},
            })
        lag_rows = []
        totals: dict[str, int] = collections.defaultdict(int)
        for key in sorted(lag):
            row = dict(lag[key])
            row.pop("_at")
            lag_rows.append(row)
            totals[row["group"]] += row["lag"]
        return stages, lag_rows, dict(totals)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The whole dashboard as one JSON-able dict (the SSE ``snapshot`` message)."""
        cfg = self.config
        self._prune(now)
        cameras = [self._camera_view(self.cameras[cid], now) for cid in sorted(self.cameras)]
        stages, lag, lag_totals = self._stages_view(now)

        if self._global_q_key is None:
            self._global_q_key, self._global_q = True, quantiles(lat for _t, lat, _b in self._samples)
        first = self._first_seen if self._first_seen is not None else now
        recent = sum(n for sec, n in self._results_per_s.items() if sec > now - cfg.rate_window_s)
        results_per_s = round(recent / self._rate_divisor(first, now), 2)

        this_minute = int(now // 60) * 60
        minutes = []
        for i in range(cfg.dead_letter_minutes - 1, -1, -1):
            t = this_minute - i * 60
            minutes.append({"t": t, "counts": dict(sorted(self._dead_minutes.get(t, {}).items()))})
        window_by_reason: collections.Counter[str] = collections.Counter()
        for c in self._dead_minutes.values():
            window_by_reason.update(c)

        active_models = sorted(
            (m for m in self.models.values() if now - m.last_seen <= 300),
            key=lambda m: m.last_seen, reverse=True,
        )
        current = max(self.models.values(), key=lambda m: m.last_seen, default=None)
        online = sum(1 for c in cameras if c["status"] == "online")
        snap = {
            "type": "snapshot",
            "generated_at": round(now, 3),
            "cameras": [],  # filled by _within_budget
            "totals": {
                "cameras": len(cameras),
                "online": online,
                "offline": len(cameras) - online,
                "results": self.results_total,
                "results_per_s": results_per_s,
                "agent_fps": round(sum((c.get("agent") or {}).get("fps", 0.0) for c in cameras if c["status"] == "online"), 2),
                "dead_letters": self.dead_letters_total,
                "cameras_refused": self.cameras_refused,
                "stages_refused": self.stages_refused,
            },
            "pipeline": {
                "stages": [],  # filled by _within_budget
                "lag": [],
                "lag_totals": lag_totals,
                "model": None if current is None else {"model_id": current.model_id, "model_version": current.model_version},
                "models": [{"model_id": m.model_id, "model_version": m.model_version, "frames": m.frames,
                            "last_seen_age_s": round(max(0.0, now - m.last_seen), 1)} for m in active_models],
            },
            "latency": {
                "window_s": cfg.latency_window_s,
                "buckets_ms": list(LATENCY_BUCKETS_MS),
                "counts": list(self._histogram),
                "n": len(self._samples),
                "quantiles": self._global_q,
            },
            "dead_letters": {
                "total": self.dead_letters_total,
                "by_reason": dict(sorted(self.dead_by_reason.items())),
                "window_by_reason": dict(sorted(window_by_reason.items())),
                "minutes": minutes,
                "recent": sorted(reversed(self._dead_recent), key=lambda d: d["seen_at"], reverse=True),
            },
        }
        return self._within_budget(snap, cameras, stages, lag[:cfg.max_lag_rows], omitted_lag=max(0, len(lag) - cfg.max_lag_rows))

    def _within_budget(self, snap: dict[str, Any], cameras: list, stages: list, lag: list, omitted_lag: int) -> dict[str, Any]:
        """``snap`` with as many cameras, stage instances and lag rows as fit in max_snapshot_bytes.

        Everything else in a snapshot is bounded by the caps of StateConfig (reasons, minutes,
        recent letters, models); stage instances get a quarter of what is left, lag rows an
        eighth, cameras the rest. What did not fit is counted in ``totals.omitted``.
        """
        snap["totals"]["omitted"] = {"cameras": 0, "stage_instances": 0, "lag_rows": 0}
        remaining = self.config.max_snapshot_bytes - json_size(snap) - 256  # 256: room for the omitted counts
        stage_budget, used = max(0, remaining // 4), 0
        kept_stages, omitted_instances = [], 0
        for st in stages:
            shell = dict(st, instances=[])
            n = json_size(shell) + 1
            if used + n > stage_budget:
                omitted_instances += len(st["instances"])
                continue
            used += n
            shell["instances"], n = fit(st["instances"], stage_budget - used)
            used += n
            omitted_instances += len(st["instances"]) - len(shell["instances"])
            kept_stages.append(shell)
        remaining -= used
        kept_lag, used = fit(lag, max(0, remaining // 8))
        remaining -= used
        kept_cameras, _ = fit(cameras, max(0, remaining))
        snap["cameras"] = kept_cameras
        snap["pipeline"]["stages"], snap["pipeline"]["lag"] = kept_stages, kept_lag
        snap["totals"]["omitted"] = {"cameras": len(cameras) - len(kept_cameras), "stage_instances": omitted_instances,
                                     "lag_rows": omitted_lag + len(lag) - len(kept_lag)}
        return snap
