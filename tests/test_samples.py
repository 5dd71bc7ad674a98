"""sampledata: real fetch of OpenCV's sample data from Debian's opencv-doc, and the loaders.

One real fetch (real apt-get download + dpkg-deb) into a session tmp cache is shared by the
tests; the failure paths are driven by monkeypatching shutil.which / subprocess.run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import sampledata as samples
from sampledata import SampleChecksumError, SamplesUnavailable


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def fetched(tmp_path_factory):
    """One real cold fetch: (cache dir, progress lines, download temp root after the fetch)."""
    cache = tmp_path_factory.mktemp("samples-cache")
    dl_root = tmp_path_factory.mktemp("samples-download")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(samples.ENV_DIR, raising=False)
        mp.setattr(tempfile, "tempdir", str(dl_root))  # the .deb goes here; must be gone after
        got = samples.fetch(cache_dir=cache, progress=lines.append)
    return cache, got, lines, dl_root


@pytest.fixture(autouse=True)
def _no_env_dir(monkeypatch):
    monkeypatch.delenv(samples.ENV_DIR, raising=False)


def _forbid_subprocesses(monkeypatch):
    def boom(*a, **k):
        raise AssertionError(f"subprocess started: {a!r}")

    monkeypatch.setattr(subprocess, "run", boom)
    monkeypatch.setattr(subprocess, "Popen", boom)


# --------------------------------------------------------------------------- checksum file


def test_checksum_file_is_sha256sum_format():
    text = (Path(samples.__file__).with_name("samples.sha256")).read_text()
    lines = [l for l in text.splitlines() if l.strip()]
    assert all(re.fullmatch(r"[0-9a-f]{64}  \S+", l) for l in lines), lines
    sums = samples.checksums()
    assert {"vtest.avi", "digits.png"} <= set(samples.SAMPLES) <= set(sums)
    for name, member in samples.SAMPLES.items():
        assert member.endswith("/" + name) and "/usr/share/doc/opencv-doc/examples/" in member


# --------------------------------------------------------------------------- real fetch


def test_real_fetch_puts_verified_files_in_cache(fetched):
    cache, got, lines, dl_root = fetched
    sums = samples.checksums()
    assert set(got) == set(samples.SAMPLES)
    for name, p in got.items():
        assert p == cache / name and p.is_file()
        assert _sha(p) == sums[name]
    assert (cache / "vtest.avi").stat().st_size > 1_000_000
    assert any("apt-get download opencv-doc" in l for l in lines), lines
    assert any("digits.png" in l and "sha256 ok" in l for l in lines), lines
    # The .deb and its temp dir are deleted; no partial files left in the cache.
    assert list(dl_root.rglob("*")) == []
    assert not list(cache.glob("*.part"))


def test_second_fetch_does_not_touch_apt(fetched, monkeypatch):
    cache, got, _, _ = fetched
    before = {n: p.stat().st_mtime_ns for n, p in got.items()}
    _forbid_subprocesses(monkeypatch)
    monkeypatch.setattr(shutil, "which", lambda *a, **k: pytest.fail("looked for apt"))
    lines: list[str] = []
    again = samples.fetch(cache_dir=cache, progress=lines.append)
    assert again == got and lines == []
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == before
    assert samples.fetch(cache_dir=cache, names=["digits.png"]) == {"digits.png": cache / "digits.png"}


def test_corrupted_cached_file_is_refetched(fetched, tmp_path):
    cache, _, _, _ = fetched
    for name in samples.SAMPLES:
        shutil.copy2(cache / name, tmp_path / name)
    vtest_inode = (tmp_path / "vtest.avi").stat().st_ino
    bad = tmp_path / "digits.png"
    data = bytearray(bad.read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    lines: list[str] = []
    got = samples.fetch(cache_dir=tmp_path, progress=lines.append)
    sums = samples.checksums()
    assert _sha(got["digits.png"]) == sums["digits.png"]
    assert any("digits.png" in l and "wrong checksum" in l for l in lines), lines
    # Only the bad file was extracted again.
    assert (tmp_path / "vtest.avi").stat().st_ino == vtest_inode


def test_corrupted_cached_file_without_apt_is_refused(fetched, tmp_path, monkeypatch):
    cache, _, _, _ = fetched
    shutil.copy2(cache / "vtest.avi", tmp_path / "vtest.avi")
    (tmp_path / "digits.png").write_bytes(b"not a png")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(SamplesUnavailable) as ei:
        samples.fetch(cache_dir=tmp_path, progress=lambda s: None)
    assert "apt-get" in str(ei.value)
    assert (tmp_path / "digits.png").read_bytes() == b"not a png"  # never replaced by anything unverified


# --------------------------------------------------------------------------- $TILESTREAM_SAMPLES_DIR


def test_env_dir_is_only_verified(fetched, tmp_path, monkeypatch):
    cache, _, _, _ = fetched
    for name in samples.SAMPLES:
        shutil.copy2(cache / name, tmp_path / name)
    monkeypatch.setenv(samples.ENV_DIR, str(tmp_path))
    _forbid_subprocesses(monkeypatch)
    assert samples.fetch() == {n: tmp_path / n for n in samples.SAMPLES}
    assert samples.path("vtest.avi") == tmp_path / "vtest.avi"
    images, labels = samples.load_digits()  # default path goes through path()
    assert images.shape == (5000, 20, 20) and labels.shape == (5000,)


def test_env_dir_with_wrong_file_raises_with_names_and_hashes(fetched, tmp_path, monkeypatch):
    cache, _, _, _ = fetched
    shutil.copy2(cache / "vtest.avi", tmp_path / "vtest.avi")
    (tmp_path / "digits.png").write_bytes(b"wrong")
    monkeypatch.setenv(samples.ENV_DIR, str(tmp_path))
    _forbid_subprocesses(monkeypatch)
    with pytest.raises(SampleChecksumError) as ei:
        samples.fetch()
    msg = str(ei.value)
    assert "digits.png" in msg
    assert samples.checksums()["digits.png"] in msg
    assert hashlib.sha256(b"wrong").hexdigest() in msg
    assert isinstance(ei.value, SamplesUnavailable) and isinstance(ei.value, RuntimeError)


def test_env_dir_with_missing_file_names_it(fetched, tmp_path, monkeypatch):
    cache, _, _, _ = fetched
    shutil.copy2(cache / "digits.png", tmp_path / "digits.png")
    monkeypatch.setenv(samples.ENV_DIR, str(tmp_path))
    _forbid_subprocesses(monkeypatch)
    with pytest.raises(SamplesUnavailable, match="vtest.avi"):
        samples.fetch()
    assert samples.fetch(names=["digits.png"]) == {"digits.png": tmp_path / "digits.png"}


# --------------------------------------------------------------------------- failure paths


def test_missing_apt_raises_with_how_to(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    _forbid_subprocesses(monkeypatch)
    with pytest.raises(SamplesUnavailable) as ei:
        samples.fetch(cache_dir=tmp_path / "c", progress=lambda s: None)
    msg = str(ei.value)
    assert "opencv-doc" in msg and samples.ENV_DIR in msg
    for name, digest in samples.checksums().items():
        assert f"{digest}  {name}" in msg
    assert "samples/data" in msg


def _fake_apt(monkeypatch, answers):
    calls: list[list[str]] = []

    def fake_run(cmd, *a, **k):
        calls.append(list(cmd))
        rc, err = answers.pop(0)
        return subprocess.CompletedProcess(cmd, rc, stdout="", stderr=err)

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


def test_unlocated_package_runs_apt_update_once_then_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "_is_root", lambda: True)
    calls = _fake_apt(
        monkeypatch,
        [
            (100, "E: Unable to locate package opencv-doc"),
            (0, ""),
            (100, "E: Unable to locate package opencv-doc"),
        ],
    )
    lines: list[str] = []
    with pytest.raises(SamplesUnavailable, match="apt-get download opencv-doc failed"):
        samples.fetch(cache_dir=tmp_path, progress=lines.append)
    assert [c[1:] for c in calls] == [["download", "opencv-doc"], ["update"], ["download", "opencv-doc"]]
    assert any("apt-get update" in l for l in lines)


def test_unlocated_package_when_not_root_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "_is_root", lambda: False)
    monkeypatch.setattr(samples, "_lists_empty", lambda: True)
    calls = _fake_apt(monkeypatch, [(100, "E: Unable to locate package opencv-doc")])
    with pytest.raises(SamplesUnavailable) as ei:
        samples.fetch(cache_dir=tmp_path, progress=lambda s: None)
    assert "root" in str(ei.value) and "package lists are empty" in str(ei.value)
    assert len(calls) == 1  # no apt-get update attempted


def test_download_failure_raises_samples_unavailable(tmp_path, monkeypatch):
    _fake_apt(monkeypatch, [(100, "E: Failed to fetch http://example.invalid/opencv-doc.deb 404")])
    with pytest.raises(SamplesUnavailable) as ei:
        samples.fetch(cache_dir=tmp_path, progress=lambda s: None)
    assert "404" in str(ei.value) and samples.ENV_DIR in str(ei.value)


def test_unknown_sample_name():
    with pytest.raises(KeyError, match="nope.png"):
        samples.fetch(names=["nope.png"])


# --------------------------------------------------------------------------- loaders


def test_load_digits(fetched):
    cache, _, _, _ = fetched
    images, labels = samples.load_digits(cache / "digits.png")
    assert images.shape == (5000, 20, 20) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.issubdtype(labels.dtype, np.integer)
    assert np.bincount(labels).tolist() == [500] * 10
    assert (labels[:500] == 0).all() and (labels[-500:] == 9).all()
    # Same split as OpenCV's digits.py split2d (np.vsplit rows, np.hsplit cells).
    import cv2

    sheet = cv2.imread(str(cache / "digits.png"), cv2.IMREAD_GRAYSCALE)
    assert sheet.shape == (1000, 2000)
    ref = np.array([np.hsplit(row, 100) for row in np.vsplit(sheet, 50)]).reshape(-1, 20, 20)
    assert np.array_equal(images, ref)
    # The first image looks like a 0: ink present, mass centred, hollow middle.
    first = images[0].astype(np.float64)
    assert (first > 127).sum() > 30
    ys, xs = np.nonzero(first > 127)
    assert abs(ys.mean() - 9.5) < 3 and abs(xs.mean() - 9.5) < 3
    assert first[8:12, 8:12].mean() < 0.5 * first[first > 0].mean()
    zeros_centre = images[labels == 0][:, 8:12, 8:12].mean()
    ones_centre = images[labels == 1][:, 8:12, 8:12].mean()
    assert zeros_centre < ones_centre / 2


def test_iter_video_frames(fetched):
    cache, _, _, _ = fetched
    frames = list(samples.iter_video_frames(cache / "vtest.avi", max_frames=3))
    assert len(frames) == 3
    for f in frames:
        assert f.shape == (576, 768, 3) and f.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[2])  # a real recording: things move
    assert list(samples.iter_video_frames(cache / "vtest.avi", max_frames=0)) == []


def test_iter_video_frames_bad_path(tmp_path):
    with pytest.raises(OSError):
        next(samples.iter_video_frames(tmp_path / "nope.avi"))
