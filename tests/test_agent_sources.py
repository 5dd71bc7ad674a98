"""The agent's image sources on hostile files: checked before decoding, counted per reason, nothing
delivered twice (pure: no broker; the agent with a real broker is in test_agent.py)."""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.sources import (Backoff, FolderProgress, SourceError, iter_folder, open_source, read_image,
                                 resilient)

from conftest import wait_for


def png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG of a few KB that declares width x height pixels (900 MP: 2.7 GB as BGR)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * width) * 8, 9)) + chunk(b"IEND", b""))


def good_jpeg(level: int = 100) -> bytes:
    return cv2.imencode(".jpg", np.full((48, 64, 3), level, np.uint8))[1].tobytes()


def hostile_folder(folder: Path, good: int = 1) -> Path:
    """``good`` good JPEGs, a corrupt .jpg, a 30000x30000 PNG header bomb, a .gif and a .txt."""
    folder.mkdir()
    for i in range(good):
        (folder / f"good{i}.jpg").write_bytes(good_jpeg(40 + 20 * i))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "bomb.png").write_bytes(png_header_bomb())
    (folder / "anim.gif").write_bytes(b"GIF89a" + b"\x00" * 32)
    (folder / "notes.txt").write_text("not an image")
    return folder


def reasons(errors: list[SourceError]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in errors:
        out[e.reason] = out.get(e.reason, 0) + 1
    return out


def test_a_folder_of_hostile_files_delivers_the_good_one_and_reports_the_rest_by_reason(tmp_path):
    folder = hostile_folder(tmp_path / "in")
    errors: list[SourceError] = []
    got = [c.origin for c in iter_folder(folder, on_bad=errors.append)]
    assert got == ["good0.jpg"]
    assert reasons(errors) == {"bad_image": 1, "too_large": 1, "unsupported_format": 2}
    by_reason = {e.reason: str(e) for e in errors}
    assert "30000x30000" in by_reason["too_large"]


def test_read_image_raises_only_source_errors_with_the_reason(tmp_path):
    cases = {
        "empty.jpg": (b"", "bad_image"),
        "half.jpg": (good_jpeg()[:300], "bad_image"),
        "bomb.png": (png_header_bomb(), "too_large"),
        "gif.png": (b"GIF89a" + b"\x00" * 32, "unsupported_format"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SourceError) as exc:
            read_image(tmp_path / name)
        assert exc.value.reason == reason, name
    with pytest.raises(SourceError) as exc:
        read_image(tmp_path / "missing.jpg")
    assert exc.value.reason == "read_failed"
    assert read_image(_write(tmp_path / "ok.jpg", good_jpeg())).shape == (48, 64, 3)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_file_over_the_byte_limit_is_too_large_before_it_is_read(tmp_path):
    from edge_agent.sources import FILE_LIMITS

    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # sparse: the size is there, the bytes are not
        f.write(good_jpeg())
        f.truncate(FILE_LIMITS.max_bytes + 1)
    with pytest.raises(SourceError) as exc:
        read_image(big)
    assert exc.value.reason == "too_large" and "bytes > limit" in str(exc.value)


def test_a_reopened_folder_source_goes_on_where_it_was_and_sends_nothing_twice(tmp_path):
    """The agent's wiring: resilient() reopens the source after an error, with the same progress."""
    folder = hostile_folder(tmp_path / "in", good=4)
    progress = FolderProgress()
    errors: list[Exception] = []
    opened = []

    def opener():
        opened.append(1)
        source = iter_folder(folder, on_bad=errors.append, progress=progress)

        def breaking():
            for n, captured in enumerate(source):
                yield captured
                if len(opened) < 3 and n == 0:  # the first two openings break after one frame
                    raise SourceError("read_failed", "the disk went away for a moment")
        return breaking()

    stop = threading.Event()
    got = [c.origin for c in resilient(opener, errors.append, stop, Backoff(0.01, 0.01))]
    assert got == ["good0.jpg", "good1.jpg", "good2.jpg", "good3.jpg"]
    assert len(opened) == 3
    # Each bad file and each skipped file reported once, whatever the number of openings.
    assert reasons([e for e in errors if isinstance(e, SourceError)]) == {
        "read_failed": 2, "bad_image": 1, "too_large": 1, "unsupported_format": 2}


def test_a_watched_folder_reports_a_skipped_file_once_and_a_refused_file_again_only_when_it_changes(tmp_path):
    folder = tmp_path / "watched"
    folder.mkdir()
    errors: list[SourceError] = []
    got: list[str] = []
    stop = threading.Event()
    source = iter_folder(folder, watch=True, poll_s=0.02, stop=stop, on_bad=errors.append)
    runner = threading.Thread(target=lambda: got.extend(c.origin for c in source), daemon=True)
    runner.start()
    try:
        (folder / "anim.gif").write_bytes(b"GIF89a")
        (folder / "bomb.png").write_bytes(png_header_bomb())
        wait_for(lambda: len(errors) == 2, 10, "the .gif and the bomb to be reported")
        (folder / "a.jpg").write_bytes(good_jpeg())
        wait_for(lambda: got == ["a.jpg"], 10, "the good file")
        (folder / "bomb.png").write_bytes(png_header_bomb(30001, 30000))  # changed: read again
        wait_for(lambda: len(errors) == 3, 10, "the changed bomb to be reported again")
        (folder / "b.jpg").write_bytes(good_jpeg(60))
        wait_for(lambda: got == ["a.jpg", "b.jpg"], 10, "the second good file")  # many polls since the .gif
    finally:
        stop.set()
        runner.join(10)
    assert reasons(errors) == {"unsupported_format": 1, "too_large": 2}


def test_a_single_image_file_source_is_checked_like_a_folder(tmp_path):
    bomb = _write(tmp_path / "bomb.png", png_header_bomb())
    errors: list[SourceError] = []
    assert list(open_source(str(bomb), on_bad=errors.append)) == [] and reasons(errors) == {"too_large": 1}
    good = _write(tmp_path / "ok.jpg", good_jpeg())
    progress = FolderProgress()
    assert [c.origin for c in open_source(str(good), progress=progress)] == ["ok.jpg"]
    assert list(open_source(str(good), progress=progress)) == []  # reopened: not again
