"""``tilestream``: the one command-line entry point.

    tilestream kafka start|stop|status|fetch   local Apache Kafka (deploy/local_kafka.py)
    tilestream samples fetch                   OpenCV sample data from Debian's opencv-doc
    tilestream keys init|enroll|rotate-device|rotate-cloud|revoke|list
    tilestream keys init-release|rotate-release|trust-release|untrust-release   model-release key
    tilestream stage-keys create|rotate|list|remove|trust-results   keys that authenticate records between stages
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
        brokers=getattr(args, "brokers", None),
        secure=getattr(args, "secure", None) or None,  # absent: the state dir's recorded mode
        internal_port=getattr(args, "internal_port", None),
    )


# -- kafka ------------------------------------------------------------------------------
def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.kafka_security import SecurityError
    from deploy.local_kafka import KafkaError
    from tilestream.topics import pipeline_topics

    try:
        lk = _local_kafka(args, settings)
        if args.action == "fetch":
            print(lk.ensure_jars())
        elif args.action == "start":
            info = lk.start(pipeline_topics(settings.kafka))
            print(f"bootstrap: {info.bootstrap}")
            if lk.secure:
                print(f"security: SASL_SSL SCRAM-SHA-512; CA {lk.ca_file}; "
                      f"credentials (mode 0600) {lk.state_dir / 'credentials.json'}")
        elif args.action == "stop":
            if not lk.stop():
                print(f"no local Kafka running for {lk.state_dir}")
        elif args.action == "status":
            info = lk.status()
            if info is None:
                print(f"down (state dir {lk.state_dir})")
                return 3
            if lk.brokers == 1:
                print(f"up: Apache Kafka {info.version} at {info.bootstrap} (pid {info.pid}); log: {info.log}")
            else:
                print(f"up: Apache Kafka {info.version} cluster at {info.bootstrap}")
                for node_id, node in lk.nodes_status().items():
                    print(f"  node {node_id}: " + (f"up at {node.host}:{node.port} (pid {node.pid}); log: {node.log}"
                                                   if node else "down"))
    except (KafkaError, SecurityError) as exc:
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
    from tilestream.keys import KeyStore

    store = KeyStore(settings.keys_path())
    if args.action in ("enroll", "rotate-device", "revoke") and not args.camera_id:
        print(f"error: keys {args.action} needs a CAMERA_ID", file=sys.stderr)
        return 2
    if args.action == "init":
        print(f"cloud key {store.init_cloud(args.suite)} in {store.path}")
    elif args.action == "rotate-cloud":
        print(f"new cloud key {store.rotate_cloud(args.suite)} ({args.suite}); older keys still open older frames")
    elif args.action == "enroll":
        print(f"enrolled {args.camera_id} with device key {store.enroll(args.camera_id)}")
    elif args.action == "rotate-device":
        kid = store.enroll(args.camera_id)
        print(f"{args.camera_id} now signs with {kid}; revoke its old key with "
              f"`tilestream keys revoke {args.camera_id} --key-id OLD` once the device uses the new one")
    elif args.action == "revoke":
        print(f"revoked {', '.join(store.revoke(args.camera_id, args.key_id)) or 'nothing'}")
    elif args.action == "list":
        print(store.registry_path.read_text() if store.registry_path.exists() else "{}")
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
        try:
            store.untrust_model_release(args.key_id)
        except (KeyError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"model release key {args.key_id} is no longer trusted here")
    return 0


def cmd_stage_keys(args: argparse.Namespace, settings: Settings) -> int:
    """The stage key (HMAC of tile batches) and the results-signing key (tilestream.stagekeys)."""
    from tilestream.stagekeys import KINDS, StageKeys

    store = StageKeys(settings.keys_path())
    kinds = (args.kind,) if args.kind else KINDS
    try:
        if args.action == "create":
            for kind, kid in store.init(kinds).items():
                print(f"{kind} key {kid} is current in {store.path / kind}")
            if "results" in kinds:
                print(f"consumers of results verify with {store.path / 'results' / '*.pub'} "
                      f"(`tilestream stage-keys trust-results --pub FILE` on their machine)")
        elif args.action == "rotate":
            if not args.kind:
                print("error: stage-keys rotate needs --kind stage|results", file=sys.stderr)
                return 2
            print(f"new {args.kind} key {store.rotate(args.kind)} is current; older {args.kind} keys still verify "
                  f"until `tilestream stage-keys remove --kind {args.kind} --key-id OLD`")
        elif args.action == "remove":
            if not args.kind or not args.key_id:
                print("error: stage-keys remove needs --kind stage|results and --key-id KID", file=sys.stderr)
                return 2
            store.remove(args.kind, args.key_id)
            print(f"{args.kind} key {args.key_id} removed: records made with it no longer verify here")
        elif args.action == "trust-results":
            if not args.pub:
                print("error: stage-keys trust-results needs --pub FILE", file=sys.stderr)
                return 2
            print(f"trusting results key {store.trust_results(args.pub)}")
        else:
            for k in store.list():
                if k.kind in kinds:
                    print(f"{k.kind:<8} {k.kid}  {'current' if k.current else '       '}  "
                          f"{'private' if k.private else 'public '}  created {k.created}")
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 0


def _add_stage_keys_parser(sub) -> None:
    sk = sub.add_parser("stage-keys", help="the stage key (MAC of tile batches) and the results-signing key")
    sk.add_argument("action", choices=["create", "rotate", "list", "remove", "trust-results"])
    sk.add_argument("--kind", choices=["stage", "results"], help="which key (create, list: both by default)")
    sk.add_argument("--key-id")
    sk.add_argument("--pub", help="trust-results: a results public key file (results/<kid>.pub of a classifier)")
    sk.set_defaults(func=cmd_stage_keys)


# -- stages -----------------------------------------------------------------------------
def cmd_agent(args: argparse.Namespace, settings: Settings) -> int:
    from edge_agent.agent import EdgeAgent
    from tilestream.keys import KeyStore
    from tilestream.metrics import serve_http

    a = settings.agent
    for name in ("source", "camera_id", "fps", "max_frames", "max_side", "encoding", "jpeg_quality", "change_threshold",
                 "state_dir", "spool_max_bytes", "spool_when_full", "http_port", "heartbeat_interval_s", "drain_timeout_s"):
        value = getattr(args, name)
        if value is not None:
            setattr(a, name, value)
    a.loop = a.loop or args.loop
    a.realtime = a.realtime or args.realtime
    a.watch = a.watch or args.watch
    if not a.source:
        print("error: no source (--source PATH|URL|DEVICE_INDEX or [agent] source in the config)", file=sys.stderr)
        return 2
    agent = EdgeAgent(a, KeyStore(settings.keys_path()), _connection(args, settings), settings.kafka.max_frame_bytes)
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

    datadir = Path(args.datadir) if args.datadir else cache_home() / "processor" / f"worker-{args.http_port or settings.processor.web_port}"
    run_worker(settings, _connection(args, settings), datadir, args.http_port, loglevel=args.loglevel)
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
    store = KeyStore(settings.keys_path())
    keys = store.model_release_keys()  # the classifier needs only the release public keys
    watcher = registry.ModelWatcher(conn, args.model_name, expected_digest=digest, keys=keys)
    path = args.model or cs.model_path
    try:
        if path:
            # The models topic is the registry: a model given as a file is published (signed with the
            # release private key of this machine's key directory) unless it is the newest.
            file_model = TileModel.load(path, expected_digest=digest)
            _, newest = watcher.latest()
            if newest is None or registry.meta_of(newest, keys)["model_id"] != file_model.model_id:
                version = registry.publish(conn, path, args.model_name, digest, keystore=store)
                print(f"publishing {path} as version {version} of model {args.model_name!r}", file=sys.stderr)
            watcher.close()
            watcher = registry.ModelWatcher(conn, args.model_name, expected_digest=digest, keys=keys)
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
    from tilestream.stagekeys import StageKeys

    try:
        stage_keys = StageKeys(settings.keys_path()).for_classifier()
    except ValueError as exc:  # ConfigError: no results-signing key here
        print(f"error: {exc}", file=sys.stderr)
        watcher.close()
        return 2
    stage = FrameClassifier(model, Metrics("tilestream_classifier"), cs.frame_timeout_s, keys=stage_keys)
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

    conn, digest = _connection(args, settings), settings.features.digest()
    store = KeyStore(settings.keys_path())
    if args.action == "publish":
        if not args.path:
            print("error: models publish needs a PATH", file=sys.stderr)
            return 2
        try:
            version = registry.publish(conn, args.path, args.model_name, digest, keystore=store)
        except (ModelRefused, FileNotFoundError) as exc:
            print(f"error: refusing to publish {args.path}: {exc}", file=sys.stderr)
            return 2
        print(f"published {args.path} as version {version} of model {args.model_name!r}")
    else:
        keys = store.model_release_public_keys()
        watcher = registry.ModelWatcher(conn, args.model_name, keys=keys)
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
    from tilestream.stagekeys import StageKeys

    keys = StageKeys(settings.keys_path()).result_keys()
    if not len(keys):
        print(f"error: no results public key in {settings.keys_path() / 'results'}: "
              "`tilestream stage-keys trust-results --pub FILE` (a classifier's results/<kid>.pub)", file=sys.stderr)
        return 2
    try:
        for r in tail(_connection(args, settings), camera_id=args.camera, from_beginning=args.from_beginning,
                      max_results=args.max, keys=keys):
            print(format_result(r), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def format_result(r) -> str:
    p = r.probabilities.get(r.label, 0.0)
    flag = "" if r.complete else f"  INCOMPLETE missing={r.missing_tiles}"
    return f"{r.camera_id:>10}  seq={r.seq:<6} label={r.label:<11} p={p:.2f}  latency={r.latency_ms:8.1f} ms{flag}"


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from dashboard.options import run

    return run(args, _connection(args, settings))


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

    k = sub.add_parser("kafka", help="run a local Apache Kafka (KRaft): one node, a 3-node cluster, secured")
    k.add_argument("action", choices=["start", "stop", "status", "fetch"])
    k.add_argument("--version", dest="kafka_version", help="Kafka version (default 4.1.1; 3.9.1 supported)")
    k.add_argument("--port", type=int)
    k.add_argument("--controller-port", type=int)
    k.add_argument("--state-dir", help="broker data/log directory (default ~/.cache/tilestream/kafka/broker-PORT)")
    k.add_argument("--brokers", type=int, help="nodes (broker+controller) on 127.0.0.1..N, same ports each "
                                               "(default 1; 3: replication 3, min.insync.replicas 2)")
    k.add_argument("--secure", action="store_true",
                   help="SASL_SSL + SCRAM-SHA-512 clients, TLS between nodes, one user + ACLs per role")
    k.add_argument("--internal-port", type=int, help="secure mode: inter-broker SSL port (default controller port + 1)")
    k.set_defaults(func=cmd_kafka)

    s = sub.add_parser("samples", help="OpenCV sample data (vtest.avi, digits.png)")
    s.add_argument("action", choices=["fetch"])
    s.set_defaults(func=cmd_samples)

    ks = sub.add_parser("keys", help="cloud key pair, device enrolment and the model-release key")
    ks.add_argument("action", choices=["init", "enroll", "rotate-device", "rotate-cloud", "revoke", "list",
                                       "init-release", "rotate-release", "trust-release", "untrust-release"])
    ks.add_argument("camera_id", nargs="?")
    ks.add_argument("--key-id")
    ks.add_argument("--pub", help="trust-release: a release public key file (release/<kid>.pub of the publisher)")
    ks.add_argument("--suite", choices=["x25519", "mlkem768-x25519"], default="x25519",
                    help="HPKE KEM of a new cloud key (mlkem768-x25519: hybrid post-quantum)")
    ks.set_defaults(func=cmd_keys)
    _add_stage_keys_parser(sub)

    a = sub.add_parser("agent", help="run the edge agent")
    a.add_argument("--source", help="video file, image folder, device index or rtsp/http URL")
    a.add_argument("--camera-id")
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

    from dashboard.options import add_arguments as dashboard_arguments

    db = sub.add_parser("dashboard", help="real-time web dashboard (reads only Kafka)", allow_abbrev=False)
    dashboard_arguments(db)  # the token: $TILESTREAM_DASHBOARD_TOKEN or --token-file, never an argument
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
