from __future__ import annotations

import pytest

from tilestream.config import FeatureConfig, load_settings


def test_defaults_then_file_then_environment(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[kafka]\nbootstrap = "10.0.0.1:9092"\nframes_partitions = 12\n[features]\ntile_size = 32\nT = 100\n')
    s = load_settings(cfg, env={"TILESTREAM_FEATURES_T": "90", "TILESTREAM_AGENT_FPS": "2.5"})
    assert s.kafka.bootstrap == "10.0.0.1:9092"
    assert s.kafka.frames_partitions == 12
    assert s.features.tile_size == 32
    assert s.features.T == 90  # environment wins over the file
    assert s.agent.fps == 2.5
    assert load_settings(env={}).kafka.bootstrap is None


def test_unknown_settings_are_errors(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[kafka]\nbootstap = 'typo'\n")
    with pytest.raises(ValueError, match="bootstap"):
        load_settings(cfg, env={})
    with pytest.raises(ValueError, match="nope"):
        load_settings(env={"TILESTREAM_AGENT_NOPE": "1"})


def test_feature_digest_tracks_every_parameter():
    base = FeatureConfig()
    assert base.digest() == FeatureConfig().digest()
    assert FeatureConfig.from_dict(base.as_dict()).digest() == base.digest()
    changed = [FeatureConfig(tile_size=32), FeatureConfig(T=127), FeatureConfig(a=1.5), FeatureConfig(w_i=(1.0, -1.0)),
               FeatureConfig(kernel=((0, 1, 0), (1, -4, 1), (0, 1, 0))), FeatureConfig(hog_bins=8), FeatureConfig(deskew=True)]
    digests = {c.digest() for c in changed}
    assert base.digest() not in digests and len(digests) == len(changed)


def test_the_example_agent_config_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "deploy" / "config" / "agent.toml"
    s = load_settings(example, env={})
    assert s.agent.camera_id == "gate-north" and s.agent.fps == 5.0 and s.agent.spool_when_full == "drop_oldest"
