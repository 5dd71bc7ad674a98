"""``tilestream demo``: the whole pipeline on one machine, on vtest.avi.

Starts the local Kafka unless a bootstrap server is configured, creates demo keys and a
scene model if missing, starts one processor worker and one classifier as child processes,
runs an edge agent on vtest.avi and prints every result as it arrives. At the end of the
file (or on Ctrl-C) it stops every process it started, the broker included if it started it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tilestream.config import Settings, cache_home
from tilestream_cli.procs import Children, wait_http


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    from classifier.results import tail
    from deploy.local_kafka import LocalKafka, free_port
    import sampledata as samples
    from tilestream_cli.models import default_model_path
    from tilestream_cli.results import format_result
    from tilestream.keys import KeyStore
    from kafkaio.clients import ensure_topics
    from tilestream.topics import pipeline_topics

    started_kafka = None
    bootstrap = args.bootstrap or settings.kafka.bootstrap
    if bootstrap is None:
        lk = LocalKafka.from_settings(settings.kafka, progress=_say)
        already = lk.status() is not None
        lk.start(pipeline_topics(settings.kafka))
        bootstrap = lk.bootstrap
        started_kafka = None if already else lk
    else:
        ensure_topics(bootstrap, pipeline_topics(settings.kafka))
    video = samples.path("vtest.avi")

    # keys-v3: signed registry, tile/ and admin/ (a keys-v2 directory has an unsigned registry).
    keys_dir = Path(settings.keys_dir) if settings.keys_dir else cache_home() / "demo" / "keys-v3"
    store = KeyStore(keys_dir)
    store.init()  # cloud, admin and tile-job keys
    store.init_model_release()  # the demo publishes its scene model: one machine holds every key
    from tilestream.stagekeys import StageKeys

    stage_keys = StageKeys(keys_dir)
    stage_keys.init()  # the stage key (tile batches) and the results-signing key
    camera = settings.agent.camera_id
    if not store.bundle_path(camera).exists():  # the agent below reads it from there (its default)
        store.enroll(camera)

    env = dict(os.environ, TILESTREAM_KAFKA_BOOTSTRAP=bootstrap, TILESTREAM_KEYS_DIR=str(keys_dir))
    model_path = default_model_path(settings)
    children = Children()
    done, tail_ready = threading.Event(), threading.Event()
    interrupted = False
    try:
        if not model_path.exists():
            _say(f"training the scene model once (cached at {model_path}) ...")
            subprocess.run([sys.executable, "-m", "tilestream_cli", "train", "--out", str(model_path)], env=env, check=True)
        web_port, metrics_port = free_port(), free_port()
        logs = cache_home() / "demo"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "processor.log", "ab") as plog, open(logs / "classifier.log", "ab") as clog:
            proc = children.start("processor", ["process", "--http-port", str(web_port), "--datadir", str(logs / "processor")],
                                  env, stdout=plog, stderr=subprocess.STDOUT)
            cls = children.start("classifier", ["classify", "--model", str(model_path), "--http-port", str(metrics_port)],
                                 env, stdout=clog, stderr=subprocess.STDOUT)
        _say(f"processor and classifier logs: {logs}/processor.log, {logs}/classifier.log")
        wait_http(f"http://127.0.0.1:{web_port}/healthz", 90, proc)
        wait_http(f"http://127.0.0.1:{metrics_port}/healthz", 90, cls)
        _say(f"processor (metrics http://127.0.0.1:{web_port}/metrics) and classifier "
             f"(http://127.0.0.1:{metrics_port}/metrics) are up; starting the agent on {video}")

        results: dict[int, object] = {}

        def printer():
            for r in tail(bootstrap, camera_id=camera, stop=done, ready=tail_ready, keys=stage_keys.result_keys()):
                print(format_result(r), flush=True)
                results[r.seq] = r

        agent_argv = ["agent", "--source", str(video), "--camera-id", camera, "--max-frames", str(args.frames)]
        if not args.no_realtime:
            agent_argv.append("--realtime")
        printer_thread = threading.Thread(target=printer, daemon=True)
        printer_thread.start()
        if not tail_ready.wait(30):  # results are read from "now", fixed before the first frame is sent
            raise TimeoutError("could not read the results topic")
        agent = children.start("agent", agent_argv, env, stdout=subprocess.PIPE, text=True)
        out, _ = agent.communicate()
        summary = next((json.loads(line) for line in out.splitlines() if '"agent_done"' in line), {})
        sent = int(summary.get("sent", 0))
        _say(f"agent done: {summary}")
        deadline = time.monotonic() + 120
        while len(results) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        done.set()
        printer_thread.join(5)
        lat = sorted(r.latency_ms for r in results.values())
        if lat:
            _say(f"{len(results)}/{sent} frames got results; capture-to-result latency p50 {lat[len(lat) // 2]:.0f} ms, "
                 f"p95 {lat[int(len(lat) * 0.95)]:.0f} ms, max {lat[-1]:.0f} ms")
        return 0 if sent and len(results) >= sent else 1
    except KeyboardInterrupt:
        interrupted = True
        _say("interrupted; stopping everything")
        return 130
    finally:
        done.set()
        children.stop_all()
        if started_kafka is not None:
            started_kafka.stop()
        elif not interrupted:
            _say(f"the local Kafka at {bootstrap} was already running and is left running")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    return run_demo(settings, args)


def register(sub) -> None:
    d = sub.add_parser("demo", help="agent + processor + classifier on vtest.avi, printing results")
    d.add_argument("--frames", type=int, default=200, help="frames of vtest.avi to send (0: whole file)")
    d.add_argument("--no-realtime", action="store_true", help="send as fast as possible instead of at the file's fps")
    d.set_defaults(func=cmd_demo)
