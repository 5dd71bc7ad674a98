"""Walking skeleton, real all the way: agent -> frames -> Faust processor -> tile-features ->
classifier -> results, on a real Apache Kafka (4.x and 3.9.x), with real vtest.avi frames.
Forged tile batches written straight to tile-features (one for a camera that was never enrolled)
become dead letters, never results; results are signed and verifiable by any client."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import base64

import cv2
import jsonschema
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from classifier.results import tail
from edge_agent.agent import EdgeAgent
from edge_agent.encode import encode_image
from stream_processor.tiling import tile_grid
from tilestream import topics
from tilestream.config import AgentSettings
from sampledata import iter_video_frames
from tilestream.records import DeadLetter, TileBatch, seal_tile_batch
from tilestream.stagekeys import StageKeys
from tilestream_cli.procs import Children, start_cloud_stages

from conftest import SUPPORTED_VERSIONS, child_env, mac_keys, read_topic, result_keys

N_FRAMES = 50
SCHEMAS = Path(__file__).resolve().parents[1] / "tilestream" / "schemas"
RESULT_SCHEMA = SCHEMAS / "result.v1.json"
SIGNED_RESULT_SCHEMA = SCHEMAS / "result.v2.json"


def forged_tile_batches(scene_model, tmp_path) -> dict[str, bytes]:
    """Well-formed tile batches with the model's feature digest (they would be classified) for
    frames that no processor made: bare, MACed with a stranger's stage key, and one under a
    stolen-looking header whose JSON was swapped."""
    from classifier.model import TileModel
    from stream_processor.tiling import Tile

    model = TileModel.load(scene_model)
    dim = model.estimator.n_features_in_
    tiles = [(Tile(i, 64 * i, 0, 64, 64), np.zeros(dim, np.float32)) for i in range(2)]

    class Ghost:  # a camera that was never enrolled
        frame_id, camera_id, seq, capture_ns, width, height = "ghost/1", "ghost", 1, time.time_ns(), 128, 64

    body = TileBatch.make(Ghost, 2, tiles, model.feature_config.digest(), time.time_ns()).to_bytes()
    stranger = StageKeys(tmp_path / "stranger-keys")
    kid = stranger.rotate("stage")
    return {"bad_mac": body, "unknown_key": seal_tile_batch(body, kid, stranger.stage_keys()[kid])}


@pytest.mark.kafka
@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_encrypted_frames_become_exactly_one_result_each(version, kafka_any, keystore, scene_model, vtest_path, tmp_path):
    broker = kafka_any(version)
    bootstrap = broker.bootstrap
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    children = Children()
    try:
        stages = start_cloud_stages(children, env, tmp_path, scene_model)
        web_port, proc, cls = stages.worker_ports[0], stages.workers[0], stages.classifier

        agent = EdgeAgent(
            AgentSettings(camera_id="cam-test", source=str(vtest_path), max_frames=N_FRAMES, jpeg_quality=80),
            keystore, bootstrap, max_frame_bytes=4 * 1024 * 1024, state_dir=tmp_path / "agent",
        )
        # Bad input first: garbage, a tampered sealed frame and a replayed frame go to dead-letters;
        # the worker keeps going.
        from kafka import KafkaProducer

        # Captured now: a frame captured long ago would be `stale` (stream_processor/replay.py).
        header, good = agent.seal(next(iter_video_frames(str(vtest_path), max_frames=1)), time.time_ns())
        tampered = bytearray(good)
        tampered[len(good) // 2] ^= 0xFF
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        producer.send(topics.FRAMES, key=b"junk", value=b"definitely not a frame")
        producer.send(topics.FRAMES, key=header.frame_id.encode(), value=good)
        producer.send(topics.FRAMES, key=header.frame_id.encode(), value=bytes(tampered))
        producer.send(topics.FRAMES, key=header.frame_id.encode(), value=good)  # replay
        forged = forged_tile_batches(scene_model, tmp_path)
        for value in forged.values():
            producer.send(topics.TILE_FEATURES, key=b"ghost/1", value=value)
        producer.flush()
        producer.close()

        counters = agent.run()
        assert counters.sent == N_FRAMES and counters.send_errors == 0

        results = []
        for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=90):
            results.append(r)
            if len({x.seq for x in results}) >= N_FRAMES + 1:
                break
        assert len({r.seq for r in results}) == N_FRAMES + 1, "not every frame produced a result"

        # Stop the classifier cleanly: everything it produced is then on the topic, so
        # reading the topic to its end shows any duplicate without waiting and hoping.
        assert children.stop(cls, name="classifier") == 0
        skipped: list = []
        all_results = [r for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=5,
                                       skipped=skipped)]
        assert skipped == [], "the classifier's own results all verify"
        seqs = sorted(r.seq for r in all_results)
        # seq 0 is the frame sent by hand (once good, once replayed), the agent's frames are 1..N.
        assert seqs == list(range(N_FRAMES + 1)), f"want exactly one result per frame, got seqs {seqs}"

        letters = [DeadLetter.from_json(m.value) for m in read_topic(bootstrap, topics.DEAD_LETTERS)]
        processor_letters = [d for d in letters if d.stage == "processor"]
        assert sorted(d.reason for d in processor_letters) == ["bad_signature", "malformed", "replay"]
        assert {d.original for d in processor_letters} == {b"definitely not a frame", bytes(tampered), good}
        # The forged tile batches: dead letters of the classifier with their reasons, and no result
        # at all for the camera that was never enrolled (not even one the tail would skip).
        classifier_letters = [d for d in letters if d.stage == "classifier"]
        assert sorted((d.reason, d.original) for d in classifier_letters) == sorted(forged.items())
        assert not [m for m in read_topic(bootstrap, topics.RESULTS) if b"ghost" in m.value]
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert 'tilestream_processor_dead_letters_total{reason="bad_signature"} 1' in metrics
        assert f"tilestream_processor_frames_total {N_FRAMES + 1}" in metrics
        assert 'tilestream_processor_dead_letters_total{reason="replay"} 1' in metrics
        # Health from what the worker does (tilestream.metrics.Liveness): it holds partitions and
        # nothing waits unread, so it is "ok" with its partitions listed, not merely up.
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=5) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "ok" and health["problems"] == [] and health["assigned_partitions"] > 0, health

        # Any Kafka client can read and verify the results: Kafka's own Java console consumer, every
        # record valid against the committed JSON Schemas (v2 envelope, v1 result inside), its
        # signature checked the way the schema tells any client to (raw Ed25519, no helper of ours).
        console = broker.tool("org.apache.kafka.tools.consumer.ConsoleConsumer", "--bootstrap-server", bootstrap,
                              "--topic", topics.RESULTS, "--from-beginning", "--max-messages", str(len(all_results)),
                              "--timeout-ms", "30000")
        lines = [line for line in console.stdout.splitlines() if line.strip()]
        assert len(lines) == len(all_results), console.stderr[-2000:]
        envelope_schema = jsonschema.Draft202012Validator(json.loads(SIGNED_RESULT_SCHEMA.read_text()))
        validator = jsonschema.Draft202012Validator(json.loads(RESULT_SCHEMA.read_text()))
        pubs = {p.stem: json.loads(p.read_text()) for p in (keystore.path / "results").glob("*.pub")}
        frame_ids = set()
        for line in lines:
            envelope = json.loads(line)
            envelope_schema.validate(envelope)
            sig = envelope["signature"]
            pub = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(pubs[sig["kid"]]["ed25519"]))
            pub.verify(base64.b64decode(sig["sig"]), b"tilestream/result/v2\x00" + envelope["result"].encode("utf-8"))
            result = json.loads(envelope["result"])
            validator.validate(result)
            frame_ids.add(result["frame_id"])
        assert frame_ids == {r.frame_id for r in all_results}

        expected_tiles = tile_grid(576, 768, 64, 0, "pad")
        for r in all_results:
            assert r.camera_id == "cam-test"
            assert r.frame_id == f"cam-test/{r.seq}"
            assert r.complete and r.missing_tiles == []
            assert r.n_tiles == len(expected_tiles) == len(r.tiles)
            assert [(t.index, t.x, t.y, t.w, t.h) for t in r.tiles] == [(t.index, t.x, t.y, t.w, t.h) for t in expected_tiles]
            assert r.label in ("person", "background") and abs(sum(r.probabilities.values()) - 1) < 1e-3
            assert r.latency_ms > 0

        # Tile features: every tile of every frame is on the topic (at least once), MACed.
        tiles = {(t.frame_id, t.tile_index) for m in read_topic(bootstrap, topics.TILE_FEATURES) if m.key != b"ghost/1"
                 for t in TileBatch.from_wire(m.value, mac_keys(keystore)).split()}
        assert tiles == {(f"cam-test/{s}", i) for s in range(N_FRAMES + 1) for i in range(len(expected_tiles))}

        # No frame travels in plaintext: raw records on `frames` do not decode as images and
        # do not contain the encoded image bytes (the same frames, encoded the same way).
        raw = read_topic(bootstrap, topics.FRAMES)
        assert len(raw) == N_FRAMES + 4
        plain = [encode_image(f, "jpeg", 80) for f in iter_video_frames(str(vtest_path), max_frames=N_FRAMES)]
        for m in raw:
            assert cv2.imdecode(np.frombuffer(m.value, np.uint8), cv2.IMREAD_UNCHANGED) is None
            for p in plain:
                assert p[:64] not in m.value and p[len(p) // 2:len(p) // 2 + 64] not in m.value
    finally:
        children.stop_all()
    assert proc.returncode is not None and cls.returncode is not None
