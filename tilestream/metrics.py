"""Counters, gauges and latency summaries in Prometheus text format, shared by every stage.

Deliberately small: labelled counters/gauges and a reservoir of recent latencies per key
(quantiles over the last ``window`` observations). Thread-safe enough for our use: each
update is a single dict operation under the GIL.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Iterable, Mapping

from tilestream.records import StageMetrics


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _value(v: float) -> str:
    """A sample value without loss: integers in full (``{:g}`` printed 19931365 as 1.99314e+07), else repr."""
    v = float(v)
    if v.is_integer() and abs(v) < 2**63:
        return str(int(v))
    return repr(v)  # also nan, inf


class Metrics:
    def __init__(self, prefix: str, window: int = 2048):
        self.prefix = prefix
        self.window = window
        self.counters: dict[tuple[str, tuple], float] = collections.defaultdict(float)
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.samples: dict[tuple[str, tuple], collections.deque] = {}
        self.started = time.time()

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        dq = self.samples.get(key)
        if dq is None:
            dq = self.samples[key] = collections.deque(maxlen=self.window)
        dq.append(seconds)
        self.inc(name + "_count", **labels)
        self.inc(name + "_sum", seconds, **labels)

    def counter(self, name: str, **labels: str) -> float:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def quantiles(self, name: str, qs: Iterable[float] = (0.5, 0.95, 0.99), **labels: str) -> dict[float, float]:
        dq = self.samples.get((name, tuple(sorted(labels.items()))))
        if not dq:
            return {}
        data = sorted(dq)
        return {q: data[min(len(data) - 1, int(q * len(data)))] for q in qs}

    def render(self) -> str:
        lines = [f"{self.prefix}_uptime_seconds {time.time() - self.started:.3f}"]
        for (name, labels), v in sorted(self.counters.items()):
            lines.append(f"{self.prefix}_{name}{_labels(dict(labels))} {_value(v)}")
        for (name, labels), v in sorted(self.gauges.items()):
            lines.append(f"{self.prefix}_{name}{_labels(dict(labels))} {_value(v)}")
        for (name, labels), _dq in sorted(self.samples.items()):
            for q, v in self.quantiles(name, **dict(labels)).items():
                lines.append(f"{self.prefix}_{name}{_labels({**dict(labels), 'quantile': str(q)})} {v:.6f}")
        return "\n".join(lines) + "\n"


def latency_ms(metrics: Metrics, name: str, **labels: str) -> dict[str, float]:
    """``{"p50": .., "p95": .., "p99": ..}`` in milliseconds of a latency summary (empty: no samples)."""
    return {f"p{int(q * 100)}": v * 1e3 for q, v in metrics.quantiles(name, **labels).items()}


class Snapshots:
    """A stage's periodic :class:`~tilestream.records.StageMetrics` from its :class:`Metrics`: the one
    place the processor and the classifier build the snapshot the dashboard reads from ``metrics``.

    What both stages put in it the same way: ``at_ns``, the interval, the group, every
    ``dead_letters_total{reason}`` counter as ``dead_letters_total:<reason>`` after the stage's own
    counters, rates per second over the time since the previous snapshot (``rates`` maps a rate
    name to the counter it is the rate of), and latencies as p50/p95/p99 in ms (a summary without
    samples is left out). The stage adds its own counters, consumer lag and extras.
    """

    def __init__(self, metrics: Metrics, stage: str, instance: str, group: str, interval_s: float,
                 rates: Mapping[str, str]):
        self.metrics = metrics
        self.stage, self.instance, self.group, self.interval_s = stage, instance, group, interval_s
        self.rates = dict(rates)
        self._at = time.monotonic()
        self._last: dict[str, float] = {counter: 0.0 for counter in self.rates.values()}

    def take(self, counters: Mapping[str, float], latencies: Mapping[str, tuple[str, dict[str, str]]],
             consumer_lag: Mapping[str, int], extra: Mapping[str, Any], dt: float | None = None) -> StageMetrics:
        """``latencies``: snapshot name -> (summary name, labels). ``dt``: seconds since the previous
        snapshot, when the caller keeps that clock itself (default: since the previous ``take``)."""
        now = time.monotonic()
        dt = max(1e-6, now - self._at if dt is None else dt)
        out = dict(counters)
        for (name, labels), value in self.metrics.counters.items():
            if name == "dead_letters_total":
                out[f"dead_letters_total:{dict(labels)['reason']}"] = value
        latency = {}
        for key, (name, labels) in latencies.items():
            q = latency_ms(self.metrics, name, **labels)
            if q:
                latency[key] = q
        rates = {rate: (out[counter] - self._last[counter]) / dt for rate, counter in self.rates.items()}
        self._at = now
        self._last = {counter: out[counter] for counter in self.rates.values()}
        return StageMetrics(stage=self.stage, instance=self.instance, at_ns=time.time_ns(), interval_s=self.interval_s,
                            counters=out, rates=rates, latency_ms=latency, consumer_lag=dict(consumer_lag),
                            group=self.group, extra=dict(extra))


class Liveness:
    """A consumer's health judged by what it does, not by being up: its loop turns, it holds
    partitions, and when records wait on them it reads some. ``problems()`` is empty when all is
    well; each problem that lasted ``stall_after_s`` is one sentence for ``/healthz`` (HTTP 503).

    Why: a classifier evicted from its group kept its poll loop turning and said "ok" for minutes
    while no frame was answered (the Production Kafka issue); being alive is not making progress.
    The classifier and every processor worker use this one judge.
    """

    def __init__(self, stall_after_s: float, clock=time.monotonic):
        self.stall_after_s = stall_after_s
        self.clock = clock
        self.last_turn = self.last_record = self.unassigned_since = clock()
        self.assigned = False

    def turned(self) -> None:
        """The loop went round once."""
        self.last_turn = self.clock()

    def read(self) -> None:
        """A record was read."""
        self.last_record = self.clock()

    def holds(self, partitions: int) -> None:
        """The consumer holds ``partitions`` now (called on every assignment change, or periodically)."""
        if partitions and not self.assigned:
            self.last_record = self.clock()  # a fresh assignment has had no time to read yet
        elif not partitions and self.assigned:
            self.unassigned_since = self.clock()
        self.assigned = bool(partitions)

    def seconds_since_record(self) -> float:
        return self.clock() - self.last_record

    def problems(self, waiting: int) -> list[str]:
        """``waiting``: records on the held partitions not read yet (the consumer's lag)."""
        now, out = self.clock(), []
        if now - self.last_turn > self.stall_after_s:
            out.append(f"loop has not turned for {now - self.last_turn:.0f}s")
        if waiting and now - self.last_record > self.stall_after_s:
            out.append(f"{waiting} records wait on assigned partitions, none read for {now - self.last_record:.0f}s")
        if not self.assigned and now - self.unassigned_since > self.stall_after_s:
            out.append(f"no partition assigned for {now - self.unassigned_since:.0f}s (evicted, not rejoining?)")
        return out


def observe_gc_pauses(metrics: Metrics, log_over_s: float = 0.05):
    """Time every run of this process's garbage collector into ``gc_pause_seconds{generation}``
    (and ``gc_pause_max_seconds``); a pause longer than ``log_over_s`` is also logged, since it
    stops every thread of a Python service, its event loop included. Returns the callback
    (``gc.callbacks.remove(cb)`` stops it)."""
    import gc

    started: list[float] = []
    log = logging.getLogger("tilestream.gc")

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            pause = time.perf_counter() - started.pop()
            gen = str(info.get("generation"))
            metrics.observe("gc_pause_seconds", pause, generation=gen)
            if pause > metrics.gauges.get(("gc_pause_max_seconds", (("generation", gen),)), 0.0):
                metrics.set("gc_pause_max_seconds", pause, generation=gen)
            if pause > log_over_s:
                log.warning(json.dumps({"event": "gc_pause", "generation": info.get("generation"),
                                        "ms": round(pause * 1e3, 1), "collected": info.get("collected")}))

    gc.callbacks.append(on_gc)
    return on_gc


def freeze_long_lived() -> int:
    """Collect once, then move every object alive now into the collector's permanent generation
    (``gc.freeze``), so later full collections walk only what was made since. Call once a service
    is up (modules, model, clients made), and again after it replaced a big long-lived object (a
    new model): objects frozen are never collected, so garbage frozen with them would stay, hence
    the collection first (and ``gc.unfreeze`` before it on a repeat call, so an old model frozen
    earlier can go). Returns the number of objects frozen.

    Why: a full collection walks every tracked object, and a service holds ~70,000 (processor:
    Faust, aiokafka, NumPy, OpenCV) to ~106,000 (classifier: scikit-learn, the model) after its
    imports alone: 37-42 and 65 ms of CPU per full collection (measured on the shared 2-core
    machine), a pause of every thread, the event loop included. The benchmarks logged such pauses
    of 58-70 ms in open loops whose capture-to-result p99 missed the goal (p99 51 and 63 ms);
    after a freeze a full collection takes well under 1 ms."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class LogBudget:
    """At most ``per_s`` log lines a second for one kind of event (with a burst of as many);
    the lines it holds back are counted and said in the next line that passes. A flood of
    forged records is counted in full by the metrics and cannot turn into a flood of logs."""

    def __init__(self, per_s: float = 10.0):
        self.per_s = per_s
        self.tokens = per_s
        self.at = time.monotonic()
        self.suppressed = 0

    def take(self) -> int | None:
        """None: do not log now. Otherwise: how many lines were held back since the last one."""
        now = time.monotonic()
        self.tokens = min(self.per_s, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return None
        self.tokens -= 1.0
        held, self.suppressed = self.suppressed, 0
        return held


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and event fields if the message is JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
        msg = record.getMessage()
        try:
            parsed = json.loads(msg)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            out.update(parsed)
        else:
            out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def serve_http(metrics: Metrics, port: int, health=lambda: {"status": "ok"}, host: str = "127.0.0.1"):
    """``/healthz`` (JSON) and ``/metrics`` (Prometheus text) on a daemon thread; returns the server."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            if self.path.startswith("/metrics"):
                body, ctype, code = metrics.render().encode(), "text/plain; version=0.0.4", 200
            elif self.path.startswith("/healthz"):
                h = health()
                body, ctype = json.dumps(h).encode(), "application/json"
                code = 200 if h.get("status") == "ok" else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the structured log clean
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
    return server


def scrape(port: int, name: str, timeout_s: float = 5.0, host: str = "127.0.0.1") -> float | None:
    """One unlabelled value from a service's Prometheus ``/metrics`` page: 0.0 when the page does
    not have it, None when the page cannot be read (the service is down or not up yet)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0
    except OSError:
        return None
