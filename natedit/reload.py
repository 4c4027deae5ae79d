"""Policy reload for a running worker (SIGHUP, ``natedit reload``).

A reload reads the policy file again. A valid policy takes effect at once for
new calls and connections (:meth:`natedit.core.translator.Translator.set_policy`:
live calls keep their public Call IDs even outside a new range, and a
tighter limit does not cut them; shorter timeouts apply to them). An invalid
one is rejected whole, logged and counted, and the running policy stays.

Some fields cannot change at run time: the public address or interface
(live calls are mapped to it), the inside networks and the queue numbers
(the firewall rules are built from them) and the metrics listen address
(the metrics server is bound to it). A reload that changes one of them is
rejected like an invalid policy, with a message saying so: restart natedit
to change them. The public address is resolved once, at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import NateditError, Policy, PolicyError
from .policyfile import FIELDS, LoadedPolicy, changes, read_policy, yaml_value
from .status import PolicyStatus

log = logging.getLogger("natedit")

BUILT_IN = "built-in default"
"""What the log says the policy came from when natedit runs without a file."""
DEFAULT_PID_FILE = "/run/natedit/natedit.pid"


def restart_problems(running: Policy, loaded: LoadedPolicy) -> list[str]:
    """Why ``loaded`` cannot replace ``running`` without a restart (empty: it can)."""
    problems = []
    for f in FIELDS:
        old, new = getattr(running, f.attr), getattr(loaded.policy, f.attr)
        if f.restart and old != new:
            problems.append(
                f"{loaded.where(f.path)}: expected {_show(yaml_value(old))} as in the running "
                f"policy (changing it needs a restart), found {_show(yaml_value(new))}"
            )
    return problems


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


class Reloader:
    """Reads the policy again on request and applies it, or keeps the running one.

    ``apply`` gets the new policy as written (public address unresolved) and may
    raise :class:`NateditError` or ValueError to reject it. ``status`` is kept up
    to date for metrics and ``natedit reload``.
    """

    def __init__(self, path: str | None, running: Policy, apply: Callable[[Policy], None],
                 status: PolicyStatus, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.running = running
        self.apply = apply
        self.status = status
        self.clock = clock
        status.source = path
        status.loaded_at = clock()

    @property
    def source(self) -> str:
        return self.path if self.path is not None else BUILT_IN

    def reload(self) -> bool:
        """One reload attempt; True when the new policy is in force. Logs one line."""
        try:
            loaded = (read_policy(self.path) if self.path is not None
                      else LoadedPolicy(Policy(), BUILT_IN, {}))
            problems = restart_problems(self.running, loaded)
            if problems:
                raise PolicyError(problems)
            self.apply(loaded.policy)
        except (NateditError, ValueError) as exc:
            problems = exc.problems if isinstance(exc, PolicyError) else [f"{self.source}: {exc}"]
            self.status.reloads["failed"] += 1
            self.status.last_error = "\n".join(problems)
            log.error("policy reload rejected, the running policy stays: %s", "; ".join(problems),
                      extra={"fields": {"event": "policy_reload_rejected", "source": self.source,
                                        "problems": problems}})
            return False
        changed = [f"{f.path} {_show(a)} -> {_show(b)}"
                   for f, a, b in changes(self.running, loaded.policy)]
        self.running = loaded.policy
        self.status.reloads["ok"] += 1
        self.status.loaded_at = self.clock()
        self.status.last_error = None
        log.info("policy reloaded from %s: %s", self.source,
                 ", ".join(changed) if changed else "no change",
                 extra={"fields": {"event": "policy_reloaded", "source": self.source,
                                   "changes": changed}})
        return True


def status_dict(status: PolicyStatus) -> dict[str, Any]:
    """The policy status as plain JSON values (the ready file carries it)."""
    return {
        "source": status.source,
        "loaded_at": status.loaded_at,
        "reloads_ok": status.reloads["ok"],
        "reloads_failed": status.reloads["failed"],
        "last_error": status.last_error,
    }


# -- pid file -------------------------------------------------------------------------------


def write_pid_file(path: str) -> None:
    """Write our PID to ``path`` (atomically; the directory is created)."""
    target = Path(path)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(target)


def remove_pid_file(path: str) -> None:
    """Remove ``path`` if it still names this process (another natedit may own it now),
    and its directory once empty."""
    try:
        if read_pid(path) == os.getpid():
            os.unlink(path)
            os.rmdir(Path(path).parent)
    except (OSError, NateditError):
        pass


def read_pid(path: str) -> int:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise NateditError(f"cannot read {path}: {exc.strerror or exc}: is natedit running?"
                           ) from exc
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        raise NateditError(f"{path} holds no PID") from None


PROCESS_NAME = b"natedit"
"""The worker's name in ``/proc/PID/comm`` (``ps -o comm``), set by :func:`name_process`."""
PR_SET_NAME = 15


def name_process() -> None:
    """Name this process ``natedit`` (``/proc/self/comm``), however it was started
    (the console script, ``python -m natedit``, an embedding ``python -c``)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME),
                                                0, 0, 0)


def is_natedit(comm: bytes, cmdline: bytes) -> bool:
    """Whether a process with this ``/proc/PID/comm`` and ``cmdline`` is a natedit worker:
    named so by :func:`name_process`, or started as the ``natedit`` command or
    ``python -m natedit``. A path that merely contains "natedit" (a checkout in
    ``~/natedit``, ``pytest natedit/tests``) does not count."""
    if comm.strip() == PROCESS_NAME:
        return True
    argv = [os.path.basename(arg) for arg in cmdline.split(b"\0")[:3]]
    if argv[0] == PROCESS_NAME:
        return True
    if not argv[0].startswith(b"python") or len(argv) < 2:
        return False
    return argv[1] == PROCESS_NAME or argv[1:3] == [b"-m", PROCESS_NAME]


def signal_worker(pid: int, source: str) -> None:
    """SIGHUP to ``pid`` once it is known to be a natedit process (not a recycled PID)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        raise NateditError(f"no process {pid} (from {source}): is natedit running?") from None
    if not is_natedit(comm, cmdline):
        raise NateditError(f"process {pid} (from {source}) is not natedit")
    os.kill(pid, signal.SIGHUP)
