"""The local broker's secret files, without a broker: created once, 0600, whole.

A 3-node secured cluster formats its nodes in parallel threads and each asks for the role
passwords; CI (stop 18) crashed when two threads both created ``credentials.json`` through one
shared temp name. These tests race many threads on a fresh state dir.
"""
from __future__ import annotations

import stat
import threading

from deploy.kafka_security import ROLES, _write_private, load_credentials


def _race(n: int, fn):
    """Run ``fn`` in ``n`` threads released together; their results, or the first exception."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_credentials_made_once_under_a_race(tmp_path):
    for round_ in range(20):
        state = tmp_path / f"state-{round_}"
        results = _race(8, lambda: load_credentials(state))
        assert all(r == results[0] for r in results), "threads got different passwords"
        assert set(results[0]["roles"]) == set(ROLES) and results[0]["cameras"] == {}
        assert load_credentials(state) == results[0]
        path = state / "credentials.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in state.iterdir()] == ["credentials.json"], "a temp file was left behind"


def test_private_writes_are_whole_and_private(tmp_path):
    path = tmp_path / "secret"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    _race(8, lambda: [_write_private(path, p) for p in payloads])
    assert path.read_bytes() in payloads
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]
