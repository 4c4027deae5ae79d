"""The lab's process supervisor: run commands, start processes, stop them by PID.

Every long-running process a lab starts goes through :class:`Processes`, which
records it with its own stop signal and grace time, sends its output to a log
file unless the caller takes the streams, and stops it (signal, wait, SIGKILL)
on request or at teardown, newest first. Only PIDs it started are signalled
(or, for ``group=True``, the process group its own ``start_new_session`` made).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class LabError(RuntimeError):
    """A lab step failed (command error, timeout waiting for readiness, ...)."""


def which(cmd: str) -> str | None:
    """shutil.which that also looks in the sbin directories (pytest may run without them)."""
    found = shutil.which(cmd)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / cmd
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 10.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; LabError (with its stderr) if it fails and ``check``."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} failed ({res.returncode}): "
            f"{res.stderr.strip() or res.stdout.strip()}"
        )
    return res


Stream = int | IO[Any] | socket.socket | None


def _fd(stream: Stream) -> int | IO[Any] | None:
    return stream.fileno() if isinstance(stream, socket.socket) else stream


@dataclass
class _Proc:
    proc: subprocess.Popen[bytes]
    name: str
    log: Path | None
    stop_signal: int
    grace: float
    group: bool


class Processes:
    """The processes one lab started, with their logs (in ``logdir``)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[_Proc] = []

    def popen(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        stdin: Stream = subprocess.DEVNULL,
        stdout: Stream = None,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pass_fds: Sequence[int] = (),
        stop_signal: int = signal.SIGTERM,
        grace: float = 2.0,
        group: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (already entering its namespace) in a session of its own.

        Unless stdout/stderr are given, both go to a log file (:meth:`log`). ``group``:
        stop signals go to the process group (for commands that fork their workers).
        """
        name = name or Path(argv[0]).name
        log: Path | None = None
        log_file: IO[bytes] | None = None
        if stdout is None or stderr is None:
            log = self.logdir / f"proc-{len(self._procs):03d}-{name}.log"
            log_file = open(log, "wb")  # noqa: SIM115 - closed right after the fork
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=_fd(stdin),
                stdout=_fd(stdout) if stdout is not None else log_file,
                stderr=stderr if stderr is not None else log_file,
                env=env,
                cwd=cwd,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._procs.append(_Proc(proc, name, log, stop_signal, grace, group))
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What ``proc`` wrote to its log file so far ("" if it has none)."""
        for p in self._procs:
            if p.proc is proc and p.log is not None:
                try:
                    return p.log.read_text(errors="replace")
                except OSError:
                    return ""
        return ""

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int | None = None, timeout: float | None = None
    ) -> int | None:
        """Stop one recorded process by PID (signal, wait, then SIGKILL). Returns its status."""
        for p in self._procs:
            if p.proc is proc:
                return self._stop(p, sig, timeout)
        raise LabError(f"process {proc.pid} was not started by this lab")

    def stop_all(self) -> list[str]:
        """Stop every recorded process, newest first; what went wrong."""
        errors: list[str] = []
        for p in reversed(self._procs):
            try:
                self._stop(p)
            except Exception as exc:  # pragma: no cover - best effort
                errors.append(f"stop {p.name}: {exc}")
        return errors

    def _stop(self, p: _Proc, sig: int | None = None, timeout: float | None = None) -> int | None:
        proc = p.proc
        kill = os.killpg if p.group else os.kill
        try:
            if proc.poll() is not None:
                return proc.returncode
            with contextlib.suppress(ProcessLookupError):
                kill(proc.pid, p.stop_signal if sig is None else sig)
            try:
                return proc.wait(timeout=p.grace if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    kill(proc.pid, signal.SIGKILL)
                return proc.wait(timeout=5)
        finally:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
