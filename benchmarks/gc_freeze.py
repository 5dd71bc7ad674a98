"""python -m benchmarks.gc_freeze processor|classifier

CPU ms of a full gc.collect() in a process holding what a service imports, before and after gc.freeze()
(the figures behind tilestream.metrics.freeze_long_lived)."""
import gc
import sys
import time

which = sys.argv[1]
if which == "processor":
    import faust, stream_processor.app, stream_processor.stage, stream_processor.features, cv2, numpy  # noqa
else:
    import classifier.service, classifier.model, sklearn.linear_model, classifier.stage  # noqa
    from classifier.train import train_scene_model  # noqa
def t():
    c0 = time.process_time(); gc.collect(); return (time.process_time() - c0) * 1e3
print(which, "objects", len(gc.get_objects()))
print(which, "full collect ms", ["%.1f" % t() for _ in range(3)])
gc.freeze()
print(which, "after freeze: full collect ms", ["%.1f" % t() for _ in range(3)], "frozen", gc.get_freeze_count())
