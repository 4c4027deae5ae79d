"""Gateway modes: what a lab gateway namespace does with PPTP.

* :meth:`Gateway.masquerade_only`: ``-t nat -A POSTROUTING -o <outside> -j
  MASQUERADE`` and nothing else (the mode natedit's worker runs under: it adds
  its own rules);
* :meth:`Gateway.kernel_helper`: MASQUERADE plus the kernel's PPTP helper
  (``nf_conntrack_pptp``/``nf_nat_pptp``) attached in the raw table;
* :meth:`Gateway.start_process`: a long-running process in the gateway
  namespace, typically natedit's worker, waited on until it is ready.

A lab with several gateways (a pair, say) makes one :class:`Gateway` per
gateway namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .netns import Netns
from .procs import LabError, Processes

PPTP_PORT = 1723


@dataclass
class Gateway:
    """One gateway namespace ``ns`` whose public side is ``outside_if``."""

    ns: str
    outside_if: str
    net: Netns
    procs: Processes
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """What :meth:`start_process` started, in order."""

    def iptables(self, *args: str) -> str:
        """iptables (iptables-nft) in the gateway namespace."""
        return self.net.exec(self.ns, ["iptables", "-w", *args]).stdout

    def masquerade_only(self) -> None:
        """Only MASQUERADE on the outside interface (TCP 1723 keeps being NATed)."""
        self.iptables("-t", "nat", "-A", "POSTROUTING", "-o", self.outside_if, "-j", "MASQUERADE")

    def kernel_helper(self) -> None:
        """MASQUERADE plus the kernel's PPTP helper attached explicitly in the raw table.

        nf_conntrack_pptp / nf_nat_pptp may be built into the kernel (no loadable
        modules); on a modular kernel they are loaded with modprobe first.
        """
        ensure_pptp_helper_available()
        self.masquerade_only()
        self.iptables("-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", str(PPTP_PORT),
                      "-j", "CT", "--helper", "pptp")

    def start_process(
        self,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool] | None = None,
        timeout: float = 10.0,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
        stop_signal: int = signal.SIGTERM,
        grace: float = 5.0,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in the gateway namespace (e.g. natedit's worker).

        ``ready`` is polled until it returns True; if the process exits first, or the
        timeout passes, LabError is raised with the process log. stdout and stderr go to
        its log (``Processes.log``). At teardown it gets ``stop_signal`` and ``grace``
        seconds before SIGKILL.
        """
        proc = self.procs.popen(
            self.net.argv(self.ns, argv),
            name=name or "gateway",
            env=env,
            cwd=cwd,
            stop_signal=stop_signal,
            grace=grace,
        )
        self.processes.append(proc)
        if ready is None:
            return proc
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LabError(
                    f"gateway process exited with {proc.returncode} before it was ready:\n"
                    + self.procs.log(proc)[-4000:]
                )
            if ready():
                return proc
            if time.monotonic() > deadline:
                raise LabError(
                    f"gateway process not ready after {timeout}s:\n"
                    + self.procs.log(proc)[-4000:]
                )
            time.sleep(0.02)

    def conntrack(self, *args: str) -> str:
        """conntrack(8) in the gateway namespace, e.g. ``conntrack("-L", "-p", "gre")``."""
        return self.net.exec(self.ns, ["conntrack", *args], check=False).stdout

    def ruleset(self) -> str:
        """The gateway's full nft ruleset (what iptables-nft and anyone else installed)."""
        return self.net.exec(self.ns, ["nft", "list", "ruleset"], check=False).stdout


_HELPER_CHECKED = False


def ensure_pptp_helper_available() -> None:
    """Make sure nf_conntrack_pptp and nf_nat_pptp exist (built in, or load the modules)."""
    global _HELPER_CHECKED
    if _HELPER_CHECKED:
        return
    if Path("/proc/modules").exists():
        for mod in ("nf_conntrack_pptp", "nf_nat_pptp"):
            subprocess.run(["modprobe", mod], capture_output=True)
    _HELPER_CHECKED = True
