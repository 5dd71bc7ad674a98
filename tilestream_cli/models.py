"""``tilestream train`` and ``tilestream models publish|show``: training and the model registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from tilestream.config import Settings

from tilestream.config import cache_home
from tilestream_cli.common import connection


def default_model_path(settings: Settings) -> Path:
    return cache_home() / "models" / f"scene-{settings.features.digest()}.skops"


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from classifier import train
    import sampledata as samples

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


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from classifier import registry
    from classifier.model import ModelRefused
    from tilestream.keys import KeyStore

    conn, digest = connection(args, settings), settings.features.digest()
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


def register(sub) -> None:
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

    mo = sub.add_parser("models", help="the model registry (compacted models topic); publishing hot-swaps classifiers")
    mo.add_argument("action", choices=["publish", "show"])
    mo.add_argument("path", nargs="?")
    mo.add_argument("--model-name", default="default")
    mo.set_defaults(func=cmd_models)
