"""Real sample data from OpenCV's own samples, taken from Debian's ``opencv-doc`` package.

``vtest.avi`` (a 768x576 pedestrian recording) feeds the edge agent and the demo;
``digits.png`` (5000 handwritten digits, 20x20 each) trains and tests the classifier.

:func:`fetch` puts them in a per-user cache (``cache_home()/samples``): it runs
``apt-get download opencv-doc`` into a temporary directory, streams the package's file
tree through ``dpkg-deb --fsys-tarfile`` and extracts only the members named in
:data:`SAMPLES`, checks each against the SHA-256 recorded in ``samples.sha256`` (package
data next to this module) and writes it atomically. When every file is already cached
with the right checksum it returns at once without running apt.

``$TILESTREAM_SAMPLES_DIR`` names a directory where the files were put by hand (for
machines without apt); then :func:`fetch` only verifies them there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO
from importlib import resources
from pathlib import Path

import numpy as np

from tilestream.config import cache_home
from tilestream.errors import TilestreamError

PACKAGE = "opencv-doc"
ENV_DIR = "TILESTREAM_SAMPLES_DIR"
_DATA = "./usr/share/doc/opencv-doc/examples/data"

#: Sample name -> path of the member inside the opencv-doc .deb (as ``dpkg-deb -c`` lists it).
SAMPLES: dict[str, str] = {
    "vtest.avi": f"{_DATA}/vtest.avi",
    "digits.png": f"{_DATA}/digits.png",
}

_CHUNK = 1 << 20
_APT_TIMEOUT_S = 1800
# What apt-get prints when its package lists do not know the package (empty lists, no update yet).
_UNLOCATED = ("unable to locate package", "has no installation candidate", "can't select", "no packages found")

Progress = Callable[[str], object]


class SamplesUnavailable(TilestreamError, RuntimeError):
    """The sample files cannot be had here (no apt, download failed, files missing)."""


class SampleChecksumError(SamplesUnavailable):
    """A sample file's SHA-256 is not the recorded one."""


def checksums() -> dict[str, str]:
    """Expected SHA-256 of each sample, read from the packaged ``samples.sha256``."""
    text = resources.files("sampledata").joinpath("samples.sha256").read_text(encoding="utf-8")
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        out[name.strip().lstrip("*")] = digest.lower()
    return out


def default_cache_dir() -> Path:
    return cache_home() / "samples"


def how_to() -> str:
    """The message telling a person how to provide the files by hand."""
    sums = checksums()
    names = " and ".join(SAMPLES)
    lines = [
        f"To provide the sample files: install the Debian/Ubuntu package {PACKAGE} from any mirror "
        f"(apt-get install {PACKAGE}; the files are under {_DATA.lstrip('.')}/), or copy {names} "
        f"from OpenCV's samples/data into a directory and point ${ENV_DIR} at it.",
        "Expected SHA-256 (sha256sum format):",
    ]
    lines += [f"  {sums.get(n, '<missing from samples.sha256>')}  {n}" for n in SAMPLES]
    return "\n".join(lines)


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _wanted(names: Iterable[str] | None) -> list[str]:
    if names is None:
        return list(SAMPLES)
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in SAMPLES]
    if unknown:
        raise KeyError(f"unknown sample(s) {', '.join(unknown)}; known: {', '.join(SAMPLES)}")
    return names


def _check(cache: Path, names: list[str], sums: dict[str, str]) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(missing names, {name: (expected, actual)} for present files whose checksum is wrong)."""
    missing, bad = [], {}
    for n in names:
        p = cache / n
        if not p.is_file():
            missing.append(n)
            continue
        actual = sha256_file(p)
        if actual != sums[n]:
            bad[n] = (sums[n], actual)
    return missing, bad


def _mismatch_text(bad: dict[str, tuple[str, str]], where: Path) -> str:
    return "\n".join(f"  {n} in {where}: expected sha256 {e}, got {a}" for n, (e, a) in bad.items())


def fetch(
    cache_dir: Path | str | None = None,
    names: Iterable[str] | None = None,
    progress: Progress = print,
) -> dict[str, Path]:
    """Make sure the samples are on disk with the right checksums; return ``{name: path}``.

    Idempotent: when every requested file is already in the cache with the right SHA-256,
    returns without running apt. With ``$TILESTREAM_SAMPLES_DIR`` set (and no ``cache_dir``
    given) the files are only verified in that directory, never downloaded.
    """
    wanted = _wanted(names)
    sums = checksums()
    unrecorded = [n for n in wanted if n not in sums]
    if unrecorded:
        raise SamplesUnavailable(f"no checksum recorded in samples.sha256 for {', '.join(unrecorded)}")

    if cache_dir is None and os.environ.get(ENV_DIR):
        return _verify_only(Path(os.environ[ENV_DIR]).expanduser(), wanted, sums)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    result = {n: cache / n for n in wanted}
    missing, bad = _check(cache, wanted, sums)
    if not missing and not bad:
        return result

    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache):
        # Another process may have fetched while we waited for the lock.
        missing, bad = _check(cache, wanted, sums)
        if not missing and not bad:
            return result
        for n, (e, a) in bad.items():
            progress(f"samples: cached {n} has the wrong checksum (expected {e}, got {a}); fetching it again")
        todo = missing + list(bad)
        _fetch_from_deb(cache, todo, sums, progress)
    return result


def path(name: str) -> Path:
    """The cached path of one sample, fetching it if needed."""
    return fetch(names=[name])[name]


_sample_path = path


def _verify_only(where: Path, wanted: list[str], sums: dict[str, str]) -> dict[str, Path]:
    missing, bad = _check(where, wanted, sums)
    problems = []
    if missing:
        problems.append(f"missing from ${ENV_DIR}={where}: {', '.join(missing)}")
    if bad:
        problems.append("wrong checksum:\n" + _mismatch_text(bad, where))
    if problems:
        cls = SampleChecksumError if bad else SamplesUnavailable
        raise cls("sample files not usable: " + "\n".join(problems) + "\n" + how_to())
    return {n: where / n for n in wanted}


@contextlib.contextmanager
def _lock(cache: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic writes still hold
        yield
        return
    with open(cache / ".fetch.lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tools() -> tuple[str, str]:
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt or not dpkg:
        lacking = " and ".join(t for t, w in (("apt-get", apt), ("dpkg-deb", dpkg)) if not w)
        raise SamplesUnavailable(f"cannot download the sample files: {lacking} not found on this machine.\n{how_to()}")
    return apt, dpkg


def _lists_empty() -> bool:
    lists = Path("/var/lib/apt/lists")
    try:
        return not any("Packages" in p.name for p in lists.iterdir())
    except OSError:
        return True


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SamplesUnavailable(f"{' '.join(cmd)} could not run: {exc}\n{how_to()}") from exc


def _tail(text: str, n: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _apt_download(apt: str, where: Path, progress: Progress) -> Path:
    """``apt-get download opencv-doc`` into ``where``; one ``apt-get update`` if apt cannot locate it."""
    updated = False
    while True:
        progress(f"samples: apt-get download {PACKAGE} (about 96 MB)")
        r = _run([apt, "download", PACKAGE], cwd=where)
        debs = sorted(where.glob(f"{PACKAGE}_*.deb"))
        if r.returncode == 0 and debs:
            return debs[0]
        err = (r.stderr or "") + (r.stdout or "")
        if not updated and any(s in err.lower() for s in _UNLOCATED):
            if not _is_root():
                empty = " (apt's package lists are empty)" if _lists_empty() else ""
                raise SamplesUnavailable(
                    f"apt cannot locate {PACKAGE}{empty}, and running apt-get update needs root: "
                    f"run `sudo apt-get update` once and try again.\n{how_to()}"
                )
            progress(f"samples: apt cannot locate {PACKAGE}; running apt-get update once")
            u = _run([apt, "update"])
            if u.returncode != 0:
                raise SamplesUnavailable(f"apt-get update failed:\n{_tail(u.stderr or u.stdout)}\n{how_to()}")
            updated = True
            continue
        raise SamplesUnavailable(f"apt-get download {PACKAGE} failed (exit {r.returncode}):\n{_tail(err)}\n{how_to()}")


def _download_dir() -> tempfile.TemporaryDirectory[str]:
    tmp = tempfile.TemporaryDirectory(prefix="tilestream-samples-")
    # apt downloads as the unprivileged _apt user; let it write here, or it falls back to
    # an unsandboxed download with a warning.
    if _is_root():
        try:
            import pwd

            os.chown(tmp.name, pwd.getpwnam("_apt").pw_uid, -1)
        except (ImportError, KeyError, OSError):
            pass
    return tmp


def _fetch_from_deb(cache: Path, todo: list[str], sums: dict[str, str], progress: Progress) -> None:
    apt, dpkg = _tools()
    with _download_dir() as tmp:
        deb = _apt_download(apt, Path(tmp), progress)
        try:
            progress(f"samples: {deb.name} ({deb.stat().st_size / 1e6:.1f} MB); extracting {', '.join(todo)}")
            _extract(dpkg, deb, cache, todo, sums, progress)
        finally:
            deb.unlink(missing_ok=True)


def _norm(member: str) -> str:
    return member[2:] if member.startswith("./") else member.lstrip("/")


def _extract(dpkg: str, deb: Path, cache: Path, todo: list[str], sums: dict[str, str], progress: Progress) -> None:
    """Stream the .deb's file tree and write only the wanted members into ``cache``."""
    # member path -> sample names to be filled from it; links are followed in a further pass.
    pending: dict[str, list[str]] = {}
    for n in todo:
        pending.setdefault(_norm(SAMPLES[n]), []).append(n)
    for _ in range(4):  # a member that is a link is read in a further pass (bounded: no loops)
        if not pending:
            return
        pending, absent = _extract_pass(dpkg, deb, cache, pending, sums, progress)
        if absent:
            names = sorted(n for ns in absent.values() for n in ns)
            raise SamplesUnavailable(f"{deb.name} does not contain {', '.join(names)}\n{how_to()}")
    if pending:
        names = sorted(n for ns in pending.values() for n in ns)
        raise SamplesUnavailable(f"{deb.name}: too many links to follow for {', '.join(names)}\n{how_to()}")


def _extract_pass(
    dpkg: str,
    deb: Path,
    cache: Path,
    pending: dict[str, list[str]],
    sums: dict[str, str],
    progress: Progress,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """One pass over the tar stream: (link targets still to read, members not found)."""
    left = dict(pending)
    links: dict[str, list[str]] = {}
    try:
        proc = subprocess.Popen([dpkg, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise SamplesUnavailable(f"dpkg-deb could not run: {exc}\n{how_to()}") from exc
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                key = _norm(member.name)
                if key not in left:
                    continue
                names = left.pop(key)
                if member.issym() or member.islnk():
                    target = member.linkname
                    if member.issym() and not target.startswith("/"):
                        target = os.path.normpath(os.path.join(os.path.dirname(key), target))
                    links.setdefault(_norm(target), []).extend(names)
                elif member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    _write_verified(src, cache, names, sums, progress)
                if not left:
                    break
    except tarfile.TarError as exc:
        raise SamplesUnavailable(f"cannot read {deb.name} with dpkg-deb --fsys-tarfile: {exc}\n{how_to()}") from exc
    finally:
        assert proc.stdout is not None
        proc.stdout.close()  # we may stop early: dpkg-deb then dies of a broken pipe, as intended
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    return links, left


def _write_verified(src: IO[bytes], cache: Path, names: list[str], sums: dict[str, str], progress: Progress) -> None:
    first = names[0]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{first}.", suffix=".part", dir=cache)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        for n in names:
            if actual != sums[n]:
                raise SampleChecksumError(
                    f"checksum mismatch for {n} extracted from {PACKAGE}: expected sha256 {sums[n]}, got {actual}"
                )
        os.chmod(tmp, 0o644)
        for n in names[1:]:
            shutil.copyfile(tmp, cache / f".{n}.part")
            os.replace(cache / f".{n}.part", cache / n)
        os.replace(tmp, cache / first)
        progress(f"samples: {', '.join(names)} ({size} bytes, sha256 ok) -> {cache}")
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- loaders

DIGIT_SIZE = 20
DIGIT_CLASSES = 10


def load_digits(path: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's digits.png as ``(images uint8 (5000, 20, 20), labels int (5000,))``.

    The sheet is 2000x1000: 50 rows of 100 digits, 500 per class in order (rows 0-4 are
    zeros, 5-9 ones, ...), split row-major exactly as ``split2d`` in OpenCV's digits.py.
    """
    import cv2

    p = Path(path) if path is not None else _sample_path("digits.png")
    img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"cannot read {p} as an image")
    h, w = img.shape
    s = DIGIT_SIZE
    if h % s or w % s:
        raise ValueError(f"{p}: {w}x{h} is not a whole number of {s}x{s} cells")
    cells = img.reshape(h // s, s, w // s, s).swapaxes(1, 2).reshape(-1, s, s)
    if len(cells) % DIGIT_CLASSES:
        raise ValueError(f"{p}: {len(cells)} cells do not split evenly into {DIGIT_CLASSES} classes")
    labels = np.repeat(np.arange(DIGIT_CLASSES, dtype=np.int64), len(cells) // DIGIT_CLASSES)
    return np.ascontiguousarray(cells, dtype=np.uint8), labels


def iter_video_frames(path: Path | str, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield BGR frames (uint8 HxWx3) of a video file via ``cv2.VideoCapture``."""
    import cv2

    if max_frames is not None and max_frames <= 0:
        return
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise OSError(f"cannot open video {path}")
        count = 0
        while max_frames is None or count < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            yield frame
            count += 1
    finally:
        cap.release()
