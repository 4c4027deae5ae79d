"""A throw-away redis-server for tests and the pair lab, stopped by PID.

Nothing is saved (no RDB, no AOF): its data lives as long as the process. It
listens on a unix socket in the given directory, and on ``bind:port`` when
given (a gateway's Redis in a namespace, which its peer replicates).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import redis

from .procs import LabError, Processes, which


@dataclass
class RedisServer:
    proc: Popen[bytes]
    socket: Path
    bind: str | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        """The local unix-socket URL (what a worker on this host is given)."""
        return f"unix://{self.socket}?db=0"

    @property
    def tcp_url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), decode_responses=True,
                           socket_timeout=2.0)

    def cli(self, *command: str) -> object:
        """One command on the unix socket (REPLICAOF, CONFIG, ...)."""
        with self.client() as c:
            return c.execute_command(*command)


def start(procs: Processes, directory: Path, *, name: str = "redis", bind: str | None = None,
          port: int | None = None, replicaof: tuple[str, int] | None = None,
          prefix: Sequence[str] = (), timeout: float = 10.0) -> RedisServer:
    """Start redis-server (``prefix``: e.g. ``ip netns exec NS``) and wait until it answers."""
    binary = which("redis-server")
    if binary is None:
        raise LabError("redis-server is missing (Debian package redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / f"{name}.sock"
    argv = [*prefix, binary, "--port", str(port or 0), "--unixsocket", str(sock),
            "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--daemonize", "no", "--protected-mode", "no",
            "--repl-timeout", "5", "--repl-ping-replica-period", "1",
            "--repl-diskless-sync-delay", "0"]  # (default 5 s before a replica's first sync)
    bind = bind or "127.0.0.1"
    argv += ["--bind", bind]
    if replicaof is not None:
        argv += ["--replicaof", replicaof[0], str(replicaof[1])]
    proc = procs.popen(argv, name=name)
    server = RedisServer(proc, sock, bind, port)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(f"redis-server exited ({proc.returncode}): {procs.log(proc)[-500:]}")
        try:
            if server.cli("PING"):
                return server
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise LabError(f"redis-server did not answer within {timeout:g} s")
        time.sleep(0.02)
