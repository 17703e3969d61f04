"""Helpers for tests that start real servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started in its own session and everything it started: a crash, not a shutdown."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextlib.contextmanager
def redis_server(password: str, certs: Path | None = None) -> Iterator[int]:
    """A real redis-server on 127.0.0.1 that requires `password` (given on its stdin, never in its arguments),
    keeps nothing on disk, checks a restored payload whole (as the chart's does), and speaks only TLS with `certs`
    (a folder `scripts.federation.init` made: its CA and the server certificate for 127.0.0.1); killed at the end.
    Yields its port."""
    port = free_port()
    listen = (["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs / "superlink.crt"),
               "--tls-key-file", str(certs / "superlink.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
               "--tls-auth-clients", "no"] if certs else ["--port", str(port)])
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "-", *listen, "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--sanitize-dump-payload", "yes"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert server.stdin is not None
        server.stdin.write(f'requirepass "{password}"\n'.encode())
        server.stdin.close()
        wait_until(lambda: accepts_connections(port), 30, "redis-server", poll=0.1)
        yield port
    finally:
        kill_group(server)
