"""``tilestream classify``: the online classifier."""

from __future__ import annotations

import argparse
import signal
import sys
from tilestream.config import Settings

from tilestream_cli.common import connection


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    from classifier import registry
    from classifier.model import ModelRefused, TileModel
    from classifier.service import ClassifierService
    from classifier.stage import FrameClassifier
    from tilestream.keys import KeyStore
    from tilestream.metrics import Metrics, serve_http

    conn, digest, cs = connection(args, settings), settings.features.digest(), settings.classifier
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


def register(sub) -> None:
    c = sub.add_parser("classify", help="run the online classifier")
    c.add_argument("--model", help="model file; published to the models topic unless it is the newest there")
    c.add_argument("--model-name", default="default", help="which model of the registry to follow")
    c.add_argument("--http-port", "--metrics-port", dest="http_port", type=int, default=0,
                   help="serve /healthz and /metrics on this port")
    c.set_defaults(func=cmd_classify)
