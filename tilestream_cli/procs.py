"""Child processes of tilestream's own commands, always stopped (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request


class Children:
    """Child processes that are always stopped: SIGTERM, then SIGKILL after a deadline."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "tilestream_cli", *argv], env=env, start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout_s: float = 20.0, name: str = "process") -> int:
        """SIGTERM the process group, SIGKILL it after ``timeout_s``; returns the exit code."""
        _signal_group(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop within {timeout_s:.0f}s; killing it", file=sys.stderr)
            _signal_group(proc, signal.SIGKILL)
            return proc.wait()

    def stop_all(self, timeout_s: float = 20.0) -> None:
        for _name, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in reversed(self.procs):
            self.stop(proc, max(0.1, deadline - time.monotonic()), name)
            # Anything the process left behind in its group goes too.
            _signal_group(proc, signal.SIGKILL, even_if_exited=True)


def _signal_group(proc: subprocess.Popen, sig: int, even_if_exited: bool = False) -> None:
    if proc.poll() is not None and not even_if_exited:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {deadline_s:.0f}s")


class CloudStages:
    """Processor workers and one classifier started as child processes, answering /healthz."""

    def __init__(self, worker_ports: list[int], metrics_port: int, workers: list[subprocess.Popen],
                 classifier: subprocess.Popen):
        self.worker_ports = worker_ports
        self.metrics_port = metrics_port
        self.workers = workers
        self.classifier = classifier


def start_cloud_stages(children: Children, env: dict[str, str], workdir, model_path, workers: int = 1,
                       timeout_s: float = 90) -> CloudStages:
    """Start ``workers`` processor workers (own web port and data dir each) and a classifier on
    ``model_path``; return once every one of them answers its health check."""
    from deploy.local_kafka import free_port

    ports = [free_port() for _ in range(workers)]
    procs = [children.start(f"processor-{i}", ["process", "--http-port", str(p), "--datadir", f"{workdir}/faust-{i}"], env)
             for i, p in enumerate(ports)]
    mport = free_port()
    cls = children.start("classifier", ["classify", "--model", str(model_path), "--http-port", str(mport)], env)
    for p, proc in zip(ports, procs):
        wait_http(f"http://127.0.0.1:{p}/healthz", timeout_s, proc)
    wait_http(f"http://127.0.0.1:{mport}/healthz", timeout_s, cls)
    return CloudStages(ports, mport, procs, cls)
