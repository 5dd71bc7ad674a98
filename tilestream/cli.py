"""``tilestream``: the one command-line entry point.

    tilestream kafka start|stop|status|fetch   local Apache Kafka (deploy/local_kafka.py)
    tilestream samples fetch                   OpenCV sample data from Debian's opencv-doc
    tilestream keys init|enroll|rotate-device|rotate-cloud|revoke|list|sign-registry|trust-admin
    tilestream keys tile-key create|rotate|list|remove   the cloud workers' shared tile-job key
    tilestream keys init-release|rotate-release|trust-release|untrust-release   model-release key
    tilestream dashboard                       real-time web dashboard
    tilestream agent                           edge agent: source -> sealed frames -> Kafka
    tilestream process                         Faust stream processor (one worker)
    tilestream train                           train a tile model
    tilestream classify                        online classifier -> results
    tilestream models publish|show             model registry; publishing hot-swaps running classifiers
    tilestream results tail                    print results as they arrive
    tilestream demo                            all of the above on vtest.avi, on the local Kafka
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from tilestream.config import Settings, cache_home, load_settings


def _bootstrap(args: argparse.Namespace, settings: Settings) -> str:
    return args.bootstrap or settings.kafka.bootstrap or f"{settings.kafka.host}:{settings.kafka.port}"


def _connection(args: argparse.Namespace, settings: Settings):
    from kafkaio import Connection

    return Connection.from_settings(settings.kafka, args.bootstrap)


def _local_kafka(args: argparse.Namespace, settings: Settings):
    from deploy.local_kafka import LocalKafka

    k = settings.kafka
    return LocalKafka(
        args.kafka_version or k.version,
        k.host,
        args.port or k.port,
        args.controller_port or k.controller_port,
        state_dir=args.state_dir,
    )


# -- kafka ------------------------------------------------------------------------------
def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.local_kafka import KafkaError
    from tilestream.topics import pipeline_topics

    lk = _local_kafka(args, settings)
    try:
        if args.action == "fetch":
            print(lk.ensure_jars())
        elif args.action == "start":
            info = lk.start(pipeline_topics(settings.kafka))
            print(f"bootstrap: {info.bootstrap}")
        elif args.action == "stop":
            if not lk.stop():
                print(f"no local Kafka running for {lk.state_dir}")
        elif args.action == "status":
            info = lk.status()
            if info is None:
                print(f"down (state dir {lk.state_dir})")
                return 3
            print(f"up: Apache Kafka {info.version} at {info.bootstrap} (pid {info.pid}); log: {info.log}")
    except KafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# -- samples ----------------------------------------------------------------------------
def cmd_samples(args: argparse.Namespace, settings: Settings) -> int:
    from tilestream import samples

    try:
        for name, path in samples.fetch(progress=lambda m: print(m, file=sys.stderr)).items():
            print(f"{name}\t{path}")
    except samples.SamplesUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# -- keys -------------------------------------------------------------------------------
def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from tilestream.errors import ConfigError
    from tilestream.keys import KeyStore, RegistryRefused

    store = KeyStore(settings.keys_path(), admin_dir=args.admin_dir)
    if args.action in ("enroll", "rotate-device", "revoke") and not args.camera_id:
        print(f"error: keys {args.action} needs a CAMERA_ID", file=sys.stderr)
        return 2
    try:
        return _keys(args, store)
    except (ConfigError, RegistryRefused, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _keys(args: argparse.Namespace, store) -> int:
    if args.action == "init":
        ids = store.init(args.suite)
        print(f"cloud key {ids['cloud']}, admin key {ids['admin']} and tile-job key {ids['tile']} in {store.path}")
        print(f"processors need {store.path} without admin/*.key (keep the admin key where devices are enrolled; "
              f"`--admin-dir` if it lives elsewhere)")
    elif args.action == "rotate-cloud":
        print(f"new cloud key {store.rotate_cloud(args.suite)} ({args.suite}); older keys still open older frames; "
              f"devices seal to it once they get a new bundle")
    elif args.action in ("enroll", "rotate-device"):
        out = Path(args.out) if args.out else store.bundle_path(args.camera_id)
        if args.action == "enroll" and out.exists():
            print(f"error: {out} exists: `tilestream keys rotate-device {args.camera_id}` makes a new device key "
                  f"(or give --out)", file=sys.stderr)
            return 2
        kid = store.enroll(args.camera_id, out)
        print(f"enrolled {args.camera_id} with device key {kid}; install {out} (mode 0600) on the camera "
              f"(`tilestream agent --bundle FILE`, or [agent] bundle)")
        if args.action == "rotate-device":
            print(f"revoke its old key with `tilestream keys revoke {args.camera_id} --key-id OLD` once the device "
                  f"uses the new bundle")
    elif args.action == "revoke":
        print(f"revoked {', '.join(store.revoke(args.camera_id, args.key_id)) or 'nothing'}")
    elif args.action == "list":
        print(json.dumps(store.devices(), indent=2, sort_keys=True))
    elif args.action == "sign-registry":
        print(f"signed the registry ({store.sign_registry()} devices) with admin key {store.init_admin()}")
    elif args.action == "trust-admin":
        if not args.pub:
            print("error: keys trust-admin needs --pub FILE", file=sys.stderr)
            return 2
        print(f"trusting registry admin key {store.trust_admin(args.pub)}")
    elif args.action == "tile-key":
        return _tile_key(args, store)
    elif args.action == "init-release":
        kid = store.init_model_release()
        print(f"model release key {kid} in {store.path / 'release'}; classifiers elsewhere need "
              f"{store.path / 'release' / (kid + '.pub')} (`tilestream keys trust-release --pub FILE`)")
    elif args.action == "rotate-release":
        print(f"models are now signed with release key {store.rotate_model_release()}; older release keys stay "
              f"trusted until `tilestream keys untrust-release --key-id OLD` (publish the models again first)")
    elif args.action == "trust-release":
        if not args.pub:
            print("error: keys trust-release needs --pub FILE", file=sys.stderr)
            return 2
        print(f"trusting model release key {store.trust_model_release(args.pub)}")
    elif args.action == "untrust-release":
        if not args.key_id:
            print("error: keys untrust-release needs --key-id KID", file=sys.stderr)
            return 2
        store.untrust_model_release(args.key_id)
        print(f"model release key {args.key_id} is no longer trusted here")
    return 0


def _tile_key(args: argparse.Namespace, store) -> int:
    what = args.camera_id
    tdir = store.path / "tile"
    if what == "create":
        kid = store.create_tile_key()
        current = store.tile_keys()[0]
        print(f"tile-job key {kid} in {tdir}" + (" (current)" if kid == current else f"; current is still {current}: "
              f"copy {tdir} to every processor host, restart them, then `tilestream keys tile-key rotate --key-id {kid}`"))
    elif what == "rotate":
        kid = store.rotate_tile_key(args.key_id)
        print(f"new tile jobs are sealed with {kid}; older keys still open in-flight jobs until "
              f"`tilestream keys tile-key remove --key-id OLD`; copy {tdir} to every processor host")
    elif what == "list":
        for k in store.list_tile_keys():
            print(f"{k['key_id']}{'  current' if k['current'] else ''}")
    elif what == "remove":
        if not args.key_id:
            print("error: keys tile-key remove needs --key-id KID", file=sys.stderr)
            return 2
        store.remove_tile_key(args.key_id)
        print(f"tile-job key {args.key_id} removed from {tdir}")
    else:
        print("error: keys tile-key create|rotate|list|remove", file=sys.stderr)
        return 2
    return 0


# -- stages -----------------------------------------------------------------------------
def cmd_agent(args: argparse.Namespace, settings: Settings) -> int:
    from edge_agent.agent import EdgeAgent
    from tilestream.errors import ConfigError
    from tilestream.keys import DeviceBundle, default_bundle_path
    from tilestream.metrics import serve_http

    a = settings.agent
    for name in ("source", "camera_id", "fps", "max_frames", "max_side", "encoding", "jpeg_quality", "change_threshold",
                 "state_dir", "spool_max_bytes", "spool_when_full", "http_port", "heartbeat_interval_s", "drain_timeout_s",
                 "bundle"):
        value = getattr(args, name)
        if value is not None:
            setattr(a, name, value)
    a.loop = a.loop or args.loop
    a.realtime = a.realtime or args.realtime
    a.watch = a.watch or args.watch
    if not a.source:
        print("error: no source (--source PATH|URL|DEVICE_INDEX or [agent] source in the config)", file=sys.stderr)
        return 2
    # The camera's keys come from its device bundle only (`tilestream keys enroll` made it).
    bundle = Path(a.bundle).expanduser() if a.bundle else default_bundle_path(settings.keys_path(), a.camera_id)
    try:
        keys = DeviceBundle.load(bundle)
    except FileNotFoundError:
        print(f"error: no device bundle at {bundle} (--bundle FILE or [agent] bundle; made by "
              f"`tilestream keys enroll {a.camera_id}`)", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    agent = EdgeAgent(a, keys, _bootstrap(args, settings), settings.kafka.max_frame_bytes)
    if a.http_port:
        from types import SimpleNamespace

        serve_http(SimpleNamespace(render=agent.render_metrics), a.http_port, agent.health)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    counters = agent.run()
    print(json.dumps({"event": "agent_done", "camera_id": a.camera_id, **vars(counters)}), flush=True)
    return 0


def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    from stream_processor.app import run_worker
    from tilestream.errors import ConfigError

    datadir = Path(args.datadir) if args.datadir else cache_home() / "processor" / f"worker-{args.http_port or settings.processor.web_port}"
    try:
        run_worker(settings, _connection(args, settings), datadir, args.http_port, loglevel=args.loglevel)
    except ConfigError as exc:  # e.g. no tile-job key: refuse to start rather than make one of our own
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def default_model_path(settings: Settings) -> Path:
    return cache_home() / "models" / f"scene-{settings.features.digest()}.skops"


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from classifier import train
    from tilestream import samples

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 - progress goes to stderr
    if args.dataset == "digits":
        # OpenCV's digits.png with its own split; the feature preset is part of the model (its digest).
        model = train.train_digits(train.DIGITS_FEATURES, kind=args.kind, progress=say)
        out = args.out or cache_home() / "models" / f"digits-{train.DIGITS_FEATURES.digest()}.skops"
    elif args.dataset == "folder":
        if not args.folder:
            print("error: --dataset folder needs --folder ROOT (one sub-folder per class)", file=sys.stderr)
            return 2
        model = train.train_folder(args.folder, settings.features, kind=args.kind, progress=say)
        out = args.out or cache_home() / "models" / f"folder-{settings.features.digest()}.skops"
    else:
        video = args.video or str(samples.path("vtest.avi"))
        model = train.train_scene_model(video, settings.features, kind=args.kind, max_frames=args.frames, progress=say)
        out = args.out or default_model_path(settings)
    out = model.save(out)
    metrics = {k: v for k, v in model.meta()["metrics"].items() if isinstance(v, (int, float, str))}
    print(json.dumps({"model": str(out), **metrics}))
    return 0


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    from classifier import registry
    from classifier.model import ModelRefused, TileModel
    from classifier.service import ClassifierService
    from classifier.stage import FrameClassifier
    from tilestream.keys import KeyStore
    from tilestream.metrics import Metrics, serve_http

    conn, digest, cs = _connection(args, settings), settings.features.digest(), settings.classifier
    bootstrap = conn.bootstrap
    store = KeyStore(settings.keys_path())
    keys = store.model_release_keys()  # the classifier needs only the release public keys
    watcher = registry.ModelWatcher(bootstrap, args.model_name, expected_digest=digest, keys=keys)
    path = args.model or cs.model_path
    try:
        if path:
            # The models topic is the registry: a model given as a file is published (signed with the
            # release private key of this machine's key directory) unless it is the newest.
            file_model = TileModel.load(path, expected_digest=digest)
            _, newest = watcher.latest()
            if newest is None or registry.meta_of(newest, keys)["model_id"] != file_model.model_id:
                version = registry.publish(bootstrap, path, args.model_name, digest, keystore=store)
                print(f"publishing {path} as version {version} of model {args.model_name!r}", file=sys.stderr)
            watcher.close()
            watcher = registry.ModelWatcher(bootstrap, args.model_name, expected_digest=digest, keys=keys)
    except (ModelRefused, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        watcher.close()
        return 2
    model = watcher.poll()
    if model is None:
        refused = "; ".join(f"{r.reason}: {r.message}" for r in watcher.pending_refusals[-3:])
        print(f"error: no usable model {args.model_name!r} on the models topic"
              f"{' (refused: ' + refused + ')' if refused else ''}; give --model PATH "
              f"(train one with `tilestream train`)", file=sys.stderr)
        watcher.close()
        return 2
    stage = FrameClassifier(model, Metrics("tilestream_classifier"), cs.frame_timeout_s)
    svc = ClassifierService(conn, stage, cs.group_id, cs.dedup_margin_s, cs.metrics_interval_s, models=watcher,
                            stall_after_s=cs.stall_after_s)
    if args.http_port:
        serve_http(svc.metrics, args.http_port, svc.health)
    signal.signal(signal.SIGTERM, lambda *_: svc.stop())
    signal.signal(signal.SIGINT, lambda *_: svc.stop())
    svc.run()
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from classifier import registry
    from classifier.model import ModelRefused
    from tilestream.keys import KeyStore

    bootstrap, digest = _bootstrap(args, settings), settings.features.digest()
    store = KeyStore(settings.keys_path())
    if args.action == "publish":
        if not args.path:
            print("error: models publish needs a PATH", file=sys.stderr)
            return 2
        try:
            version = registry.publish(bootstrap, args.path, args.model_name, digest, keystore=store)
        except (ModelRefused, FileNotFoundError) as exc:
            print(f"error: refusing to publish {args.path}: {exc}", file=sys.stderr)
            return 2
        print(f"published {args.path} as version {version} of model {args.model_name!r}")
    else:
        keys = store.model_release_public_keys()
        watcher = registry.ModelWatcher(bootstrap, args.model_name, keys=keys)
        try:
            version, data = watcher.latest()
            refusals = watcher.take_refusals()
        finally:
            watcher.close()
        for r in refusals:
            print(f"refused record at offset {r.offset}: {r.reason}: {r.message}", file=sys.stderr)
        if data is None:
            print(f"no verified model {args.model_name!r} published")
            return 3
        print(json.dumps(registry.meta_of(data, keys), indent=2))
    return 0


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    from classifier.results import tail

    try:
        for r in tail(_bootstrap(args, settings), camera_id=args.camera, from_beginning=args.from_beginning, max_results=args.max):
            print(format_result(r), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def format_result(r) -> str:
    p = r.probabilities.get(r.label, 0.0)
    flag = "" if r.complete else f"  INCOMPLETE missing={r.missing_tiles}"
    return f"{r.camera_id:>10}  seq={r.seq:<6} label={r.label:<11} p={p:.2f}  latency={r.latency_ms:8.1f} ms{flag}"


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from dashboard.server import TOKEN_ENV, DashboardError, run_dashboard

    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        run_dashboard(_bootstrap(args, settings), args.host, args.port, token)
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from tilestream.demo import run_demo

    return run_demo(settings, args)


# -- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tilestream", description="Edge-to-cloud image recognition on Apache Kafka.")
    p.add_argument("--config", help="TOML configuration file (default: $TILESTREAM_CONFIG)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: [kafka] bootstrap, else the local broker)")
    p.add_argument("--log-level", default=os.environ.get("TILESTREAM_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kafka", help="run a local single-node Apache Kafka (KRaft)")
    k.add_argument("action", choices=["start", "stop", "status", "fetch"])
    k.add_argument("--version", dest="kafka_version", help="Kafka version (default 4.1.1; 3.9.1 supported)")
    k.add_argument("--port", type=int)
    k.add_argument("--controller-port", type=int)
    k.add_argument("--state-dir", help="broker data/log directory (default ~/.cache/tilestream/kafka/broker-PORT)")
    k.set_defaults(func=cmd_kafka)

    s = sub.add_parser("samples", help="OpenCV sample data (vtest.avi, digits.png)")
    s.add_argument("action", choices=["fetch"])
    s.set_defaults(func=cmd_samples)

    ks = sub.add_parser("keys", help="cloud key pair, device enrolment, tile-job keys and the model-release key")
    ks.add_argument("action", choices=["init", "enroll", "rotate-device", "rotate-cloud", "revoke", "list",
                                       "sign-registry", "trust-admin", "tile-key",
                                       "init-release", "rotate-release", "trust-release", "untrust-release"])
    ks.add_argument("camera_id", nargs="?", help="the camera (enroll, rotate-device, revoke); "
                                                 "tile-key: create|rotate|list|remove")
    ks.add_argument("--key-id")
    ks.add_argument("--out", help="enroll/rotate-device: the device bundle to write (default bundles/CAMERA.bundle "
                                  "next to the keys directory)")
    ks.add_argument("--admin-dir", help="where the admin (registry-signing) private key is (default KEYS_DIR/admin)")
    ks.add_argument("--pub", help="trust-release/trust-admin: a public key file (<kid>.pub of the other machine)")
    ks.add_argument("--suite", choices=["x25519", "mlkem768-x25519"], default="x25519",
                    help="HPKE KEM of a new cloud key (mlkem768-x25519: hybrid post-quantum)")
    ks.set_defaults(func=cmd_keys)

    a = sub.add_parser("agent", help="run the edge agent")
    a.add_argument("--source", help="video file, image folder, device index or rtsp/http URL")
    a.add_argument("--camera-id")
    a.add_argument("--bundle", help="device bundle from `tilestream keys enroll` (default bundles/CAMERA.bundle "
                                    "next to the keys directory)")
    a.add_argument("--fps", type=float)
    a.add_argument("--max-frames", type=int)
    a.add_argument("--max-side", type=int)
    a.add_argument("--encoding", choices=["jpeg", "png", "webp"])
    a.add_argument("--jpeg-quality", type=int)
    a.add_argument("--change-threshold", type=float, help="skip frames whose thumbnail changed less than this (0..255)")
    a.add_argument("--loop", action="store_true")
    a.add_argument("--realtime", action="store_true", help="pace a video file at its own fps")
    a.add_argument("--watch", action="store_true", help="image folder: keep watching for new files")
    a.add_argument("--state-dir", help="seq counter, spool and offsets (default ~/.cache/tilestream/agent/CAMERA)")
    a.add_argument("--spool-max-bytes", type=int)
    a.add_argument("--spool-when-full", choices=["drop_oldest", "block"])
    a.add_argument("--http-port", type=int, help="serve /healthz and /metrics on this port")
    a.add_argument("--heartbeat-interval-s", type=float)
    a.add_argument("--drain-timeout-s", type=float, help="at the end of a finite source, wait this long to send the spool")
    a.set_defaults(func=cmd_agent)

    pr = sub.add_parser("process", help="run a stream-processor worker (Faust)")
    pr.add_argument("--http-port", "--web-port", dest="http_port", type=int,
                    help="/healthz and /metrics port (each worker needs its own)")
    pr.add_argument("--datadir", help="Faust data directory (each worker needs its own)")
    pr.add_argument("--loglevel", default="warning")
    pr.set_defaults(func=cmd_process)

    t = sub.add_parser("train", help="train a tile model")
    t.add_argument("--dataset", choices=["scene", "digits", "folder"], default="scene",
                   help="scene: person/background tiles of a camera video; digits: OpenCV's digits.png; "
                        "folder: an image folder with one sub-folder per class")
    t.add_argument("--folder", help="root of the image-folder dataset")
    t.add_argument("--video", help="video of the camera for the scene model (default vtest.avi)")
    t.add_argument("--kind", choices=["svm", "logistic"], default="svm")
    t.add_argument("--frames", type=int, default=400)
    t.add_argument("--out")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("classify", help="run the online classifier")
    c.add_argument("--model", help="model file; published to the models topic unless it is the newest there")
    c.add_argument("--model-name", default="default", help="which model of the registry to follow")
    c.add_argument("--http-port", "--metrics-port", dest="http_port", type=int, default=0,
                   help="serve /healthz and /metrics on this port")
    c.set_defaults(func=cmd_classify)

    mo = sub.add_parser("models", help="the model registry (compacted models topic); publishing hot-swaps classifiers")
    mo.add_argument("action", choices=["publish", "show"])
    mo.add_argument("path", nargs="?")
    mo.add_argument("--model-name", default="default")
    mo.set_defaults(func=cmd_models)

    r = sub.add_parser("results", help="read the results topic")
    r.add_argument("action", choices=["tail"])
    r.add_argument("--camera")
    r.add_argument("--from-beginning", action="store_true")
    r.add_argument("--max", type=int, default=0)
    r.set_defaults(func=cmd_results)

    db = sub.add_parser("dashboard", help="real-time web dashboard (reads only Kafka)")
    db.add_argument("--host", default="127.0.0.1")
    db.add_argument("--port", type=int, default=8080)
    db.add_argument("--token", help="access token (default $TILESTREAM_DASHBOARD_TOKEN); required off loopback")
    db.set_defaults(func=cmd_dashboard)

    d = sub.add_parser("demo", help="agent + processor + classifier on vtest.avi, printing results")
    d.add_argument("--frames", type=int, default=200, help="frames of vtest.avi to send (0: whole file)")
    d.add_argument("--no-realtime", action="store_true", help="send as fast as possible instead of at the file's fps")
    d.set_defaults(func=cmd_demo)
    return p


def _import_faust_without_our_argv() -> None:
    """Import faust once with ``--loop``/``-L`` hidden from it.

    ``faust/__init__.py`` scans ``sys.argv`` at import time for its worker's ``-L/--loop EVENT_LOOP``
    option and imports the module named by the next argument, so ``tilestream agent --loop ...``
    (replay the video file; the agent imports faust through ``tilestream.records``) died with
    ``ModuleNotFoundError: No module named '--max-side'`` (or click's "Missing value" at the end).
    """
    saved = sys.argv
    kept = [a for a in saved if a not in ("--loop", "-L") and not a.startswith("--loop=")]
    if len(kept) == len(saved) or "faust" in sys.modules:
        return
    sys.argv = kept
    try:
        import faust  # noqa: F401 - imported for its side effects on sys.argv parsing only
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` dumps every thread's stack
    args = build_parser().parse_args(argv)
    _import_faust_without_our_argv()
    from tilestream.metrics import setup_logging

    setup_logging(args.log_level)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = load_settings(args.config)
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
