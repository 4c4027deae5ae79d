"""The queue worker: NFQUEUE in, verdicts out, around the sans-I/O translator.

Theory of operation
-------------------
Two netfilter queues feed one translator: whatever arrives on
``policy.queue_outbound`` is :attr:`Direction.OUTBOUND`, whatever arrives on
``policy.queue_inbound`` is INBOUND (:mod:`natedit.rules` decides which
packets go where). One thread, one ``epoll`` loop over the two queue
sockets and a signal wake-up pipe; the loop sleeps until a packet comes or
the translator's next deadline (``time.monotonic()``) is due. What start-up
made (modules, the restored table) is frozen out of the garbage collector
(``gc.freeze``) when the loop starts, so that a collection never walks it
between two packets (a full one took 9 ms here).

Start: restore the call table from the state file (:mod:`natedit.state`;
every call event is written back to it once per turn of the loop), bind
both queues, serve metrics (:mod:`natedit.metrics`, on
``policy.metrics_listen``, in threads of their own) and the live call events
(:mod:`natedit.eventstream`: each batch the loop logs is handed to the
readers' bounded queues, never waited for), then install the rules
(so that no packet is ever queued to nobody by natedit's own start), then
announce readiness: the line ``natedit: ready ...`` on stderr, the
``--ready-file`` and, under systemd, ``READY=1``. Stop (SIGTERM, SIGINT):
remove the rules, then unbind; the kernel drops what was still queued.
SIGHUP (``natedit reload``) reloads the policy file between two packets
(:mod:`natedit.reload`: a valid policy applies to new calls, an invalid one
is rejected and the running one stays); the ready file then carries the
outcome. The PID is in ``--pid-file`` while the worker runs. SIGUSR2 stops
for a restart: the rules stay (PPTP is queued to nobody, fail-closed, as
after a crash) until the next worker, which restores the calls from the
state file, takes over; a stop with SIGTERM removes them, and during the
gap the kernel answers the servers' GRE with ICMP, so servers may end calls.

With ``datapath: kernel`` (:mod:`natedit.fastpath`) the worker also keeps
the maps of a tc-BPF program that translates GRE of established calls in the
kernel: each turn's call events update them (one batch per turn), and their
element counters are read every few seconds and before timers run, so idle
timers and GRE metrics see that traffic too. A reload may switch datapaths.

The rules claim only natedit's own traffic (:mod:`natedit.rules`): GRE
whose key is in the ownership sets the worker keeps equal to its call table
(:mod:`natedit.owned`; updated before the verdict of a packet whose events
changed the table, and at the end of each turn). Failure is closed for
natedit's own calls: GRE rules carry no queue bypass, so while no worker is
bound (not started yet, crashed, stopped without removing its rules) or a
queue is full their GRE is dropped, and with ``on_worker_down: drop`` (the
default) new control connections too; ``pass`` lets new control connections
(and so their calls' GRE, which no set holds) through untranslated while no
worker is bound. The per-packet path is
:mod:`natedit.nfqueue`: an exception while handling one packet drops that
packet, is counted and logged (at most once per :data:`ERROR_LOG_INTERVAL`
per kind), and the worker goes on.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, runtime_checkable

from . import (
    Datapath,
    Direction,
    Event,
    NateditError,
    Policy,
    ProtocolViolation,
    Translator,
    conntrack,
    eventstream,
    fastpath,
    host,
    metrics,
    nfqueue,
    owned,
    reload,
    rules,
    state,
)
from . import pair as pair_mod
from .logs import Throttle, event_fields, format_event, held_back
from .status import PolicyStatus

log = logging.getLogger("natedit")

ERROR_LOG_INTERVAL = 1.0
"""Seconds between two log lines of one kind of per-packet trouble."""
TIMER_ERROR_BACKOFF = 1.0
"""Seconds before retrying timers after handle_timer raised (no busy loop)."""
RESTART_SIGNAL = signal.SIGUSR2
"""Stop, leaving the rules in place for the next worker (a restart that keeps calls)."""


class PacketTranslator(nfqueue.Decider, Protocol):
    """What the worker uses of :class:`natedit.core.translator.Translator`."""

    def next_deadline(self) -> float | None: ...
    def handle_timer(self, now: float) -> list[Event]: ...


@runtime_checkable
class Reconfigurable(Protocol):
    """A translator that can take a new policy while it runs (a reload)."""

    def set_policy(self, policy: Policy) -> None: ...


# -- around the translator ---------------------------------------------------------


class Dispatcher:
    """The translator's surroundings: its per-packet path, timers, events, persistence.

    No sockets: the queues call the callbacks of :attr:`packets`, the loop calls
    :meth:`run_timers` and :meth:`flush`. ``counts`` holds the worker's own trouble
    (``packet_error``, ``timer_error``, ``fastpath_error``); the translator counts
    the rest.
    """

    def __init__(
        self, translator: PacketTranslator, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.translator = translator
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._throttle = Throttle(ERROR_LOG_INTERVAL, clock)
        self.journal: state.Journal | None = None
        """Where call events go to be persisted (:mod:`natedit.state`); None: nowhere."""
        self.fastpath: fastpath.KernelDatapath | None = None
        """The kernel fast path (``datapath: kernel``): call events update it, its
        counters are read before timers; None: every GRE packet comes through the queue."""
        self.events: eventstream.EventHub | None = None
        """Where call events go to ``natedit events`` readers; None: nowhere."""
        self.ownership: owned.Ownership | None = None
        """The ownership sets (:mod:`natedit.owned`): call events update them, before the
        verdict of the packet that made them; None: a translator without a call table."""
        self.packets = nfqueue.PacketPath(
            translator, clock, self.counts,  # late-bound: a test may replace either
            lambda events: self.log_events(events),
            lambda kind, what: self._log_trouble(kind, what),
            lambda events: self.settle(events))
        """The per-packet path (:mod:`natedit.nfqueue`): the queues' callbacks."""

    def run_timers(self) -> float | None:
        """Call ``handle_timer`` when due; the next deadline (None: no timer).

        With the kernel fast path, its counters are read when due and before a due
        timer runs (a call whose GRE the kernel translates is not idle).
        """
        fast = self.fastpath
        now = self.clock()
        if fast is not None and now >= fast.next_sync:
            fast.sync(now)
        deadline = self.translator.next_deadline()
        if deadline is None or deadline > now:
            return _earliest(deadline, fast)
        if fast is not None and fast.stale(now):
            fast.sync(now)
        try:
            self.log_events(self.translator.handle_timer(now))
            return _earliest(self.translator.next_deadline(), fast)
        except Exception:
            self.counts["timer_error"] += 1
            self._log_trouble("timer_error", "timers failed")
            return now + TIMER_ERROR_BACKOFF

    def settle(self, events: Iterable[Event]) -> None:
        """Before a packet's verdict: a call its events added or changed is to be claimed
        in the kernel's ownership sets first (its GRE may follow the packet at once); the
        verdict waits in a batch, which calls :meth:`settle_pending` before it is sent
        (one transaction for the batch)."""
        if self.ownership is not None:
            self.ownership.note(events)

    def settle_pending(self) -> None:
        """Before a batch of verdicts goes to the kernel: what its packets' events
        changed goes into the ownership sets."""
        if self.ownership is not None and self.ownership.pending:
            self.ownership.flush()

    def flush(self) -> None:
        """Once per turn of the loop: put what the events of this turn changed into the
        ownership sets and the kernel fast path, and persist it."""
        if self.ownership is not None:
            self.ownership.flush()
        if self.fastpath is not None:
            self.fastpath.flush()
        if self.journal is not None:
            self.journal.commit()

    def ownership_trouble(self, what: str) -> None:
        """The ownership sets could not be updated (they are rebuilt): count, log."""
        self.counts["ownership_error"] += 1
        suppressed = self._throttle.allow("ownership_error")
        if suppressed is not None:
            log.error("ownership_error: %s%s", what, held_back(suppressed))

    def fastpath_trouble(self, what: str) -> None:
        """The kernel fast path failed at something (it repairs itself): count, log."""
        self.counts["fastpath_error"] += 1
        suppressed = self._throttle.allow("fastpath_error")
        if suppressed is not None:
            log.error("fastpath_error: %s%s", what, held_back(suppressed))

    def log_events(self, events: Iterable[Event]) -> None:
        if (self.journal is not None or self.fastpath is not None or self.events is not None
                or self.ownership is not None):
            events = tuple(events)
        if self.ownership is not None:
            self.ownership.note(events)
        if self.events is not None:
            self.events.publish(events)
        if self.journal is not None:
            self.journal.note(events)
        if self.fastpath is not None:
            self.fastpath.note(events)
        for event in events:
            fields = {"fields": event_fields(event)}  # the JSON log format's keys
            if isinstance(event, ProtocolViolation):
                suppressed = self._throttle.allow(f"violation:{event.reason}")
                if suppressed is not None:
                    if suppressed:
                        fields["fields"]["suppressed"] = suppressed
                    log.warning("%s%s", format_event(event), held_back(suppressed),
                                extra=fields)
            else:
                log.info("%s", format_event(event), extra=fields)

    def _log_trouble(self, kind: str, what: str) -> None:
        suppressed = self._throttle.allow(kind)
        if suppressed is not None:
            log.exception("%s: %s%s", kind, what, held_back(suppressed))


def _pair_signals(session: pair_mod.Session | None) -> frozenset[int]:
    """What an active worker ignores: promote; and demote too when not one of a pair."""
    if session is None:
        return frozenset({pair_mod.PROMOTE_SIGNAL, pair_mod.DEMOTE_SIGNAL})
    return frozenset({pair_mod.PROMOTE_SIGNAL})


def _earliest(deadline: float | None, fast: fastpath.KernelDatapath | None) -> float | None:
    if fast is None:
        return deadline
    return fast.next_sync if deadline is None else min(deadline, fast.next_sync)


# -- the loop ---------------------------------------------------------------------


def run(
    policy: Policy,
    *,
    flavour: rules.Flavour = rules.Flavour.IPTABLES,
    ready_file: str | None = None,
    make_translator: Callable[[Policy], PacketTranslator] | None = None,
    policy_status: PolicyStatus | None = None,
    policy_path: str | None = None,
    pid_file: str | None = None,
    on_reload: Callable[[Policy], None] | None = None,
    state_path: str | None = None,
    events_socket: str | None = None,
    pair: pair_mod.Session | None = None,
) -> int:
    """``natedit run``: serve until SIGTERM or SIGINT; 0 after a clean stop.

    ``policy`` was loaded from ``policy_path`` (None: the built-in default), which
    SIGHUP reads again; ``on_reload`` gets each policy a reload put in force.
    ``state_path``: the state file the call table is restored from and kept in
    (:mod:`natedit.state`; None: none). ``events_socket``: where ``natedit events``
    reads the call events (:mod:`natedit.eventstream`; None: nowhere). ``pair``: one
    gateway of a pair (:mod:`natedit.pair`): the followed table is restored, and
    ``natedit demote`` stops the worker leaving its rules (None: promote and demote
    are ignored).

    Raises :class:`natedit.NateditError` when it cannot start (no public
    address, the kernel PPTP helper attached, a queue in use, rules refused).
    """
    configured = policy
    public = host.public_address(policy)
    policy = policy.with_public_address(public)
    ruleset = rules.build_ruleset(policy)
    rules.check_no_pptp_helper(ruleset.inside_networks)
    translator = (make_translator or Translator)(policy)
    dispatcher = Dispatcher(translator)
    nat = _read_nat(policy, translator, dispatcher)
    status = policy_status if policy_status is not None else PolicyStatus(loaded_at=time.time())

    def set_datapath(datapath: Datapath) -> None:
        """Start or stop the kernel fast path; raises NateditError when it cannot start."""
        fast = dispatcher.fastpath
        if datapath is Datapath.KERNEL and fast is None:
            if not isinstance(translator, Translator):
                raise NateditError("datapath kernel needs natedit's own translator")
            fast = fastpath.KernelDatapath(translator, report=dispatcher.fastpath_trouble)
            try:
                fast.start()
            except BaseException:
                fast.close()
                raise
            dispatcher.fastpath = fast
        elif datapath is Datapath.USERSPACE and fast is not None:
            dispatcher.fastpath = None
            fast.stop()

    def apply(new: Policy) -> None:
        if not isinstance(translator, Reconfigurable):
            raise NateditError("this translator cannot take a new policy")
        set_datapath(new.datapath)
        translator.set_policy(new.with_public_address(public))
        if on_reload is not None:
            on_reload(new)

    reloader = reload.Reloader(policy_path, configured, apply, status)
    hub = eventstream.EventHub()
    table = getattr(translator, "table", None)
    if table is not None:
        dispatcher.ownership = owned.Ownership(translator,  # type: ignore[arg-type]
                                               report=dispatcher.ownership_trouble)
    extra = (hub, owned.OwnershipCollector(dispatcher.ownership))
    collector = metrics.worker_collector(translator, dispatcher.counts, status, policy,
                                         queue_maxlen=nfqueue.QUEUE_MAXLEN,
                                         extra=extra if pair is None else (*extra, pair),
                                         kernel=lambda: dispatcher.fastpath)
    queues = {policy.queue_outbound: Direction.OUTBOUND, policy.queue_inbound: Direction.INBOUND}
    verdicts = [nfqueue.Verdicts(number, dispatcher.counts,
                                 lambda what: dispatcher._log_trouble("packet_error", what))
                for number in queues]  # one batch of verdicts per queue and turn
    for batch in verdicts:
        batch.before_send = dispatcher.settle_pending
    with (
        state.journal(translator, state_path, dispatcher.counts,
                      pair.followed if pair is not None else None) as journal,
        _signals(ignore=_pair_signals(pair)) as wakeup,
        nfqueue.bound({number: dispatcher.packets.callback(direction, batch)
                       for (number, direction), batch in zip(queues.items(), verdicts,
                                                             strict=True)}) as bound,
        metrics.serving(policy.metrics_listen, collector),  # /metrics and /calls
        _serving_events(events_socket, hub),
    ):
        dispatcher.journal = journal
        if pair is not None and isinstance(translator, Translator):
            pair.snapshot = translator.snapshot
        dispatcher.events = hub if events_socket is not None else None
        ownership = dispatcher.ownership
        installation = rules.install(ruleset, flavour,
                                     None if ownership is None else ownership.start())
        try:
            set_datapath(policy.datapath)
            reload.name_process()
            if pid_file is not None:  # before the ready line: whoever waits for it finds us
                try:
                    reload.write_pid_file(pid_file)
                except OSError as exc:  # natedit reload --ready-file still finds us
                    log.warning("cannot write the pid file %s: %s", pid_file, exc)
            info = _announce_ready(policy, flavour, ready_file, status,
                                   {} if pair is None else {"role": "active"})

            def on_hangup() -> None:
                reloader.reload()
                if ready_file is not None:
                    _write_ready_file(ready_file, {**info, "policy": reload.status_dict(status)})

            _loop(bound, wakeup, dispatcher, on_hangup, verdicts)
        finally:
            if nat is not None:
                nat.close()
            if dispatcher.fastpath is not None:  # (the kernel deletes it anyway at exit)
                dispatcher.fastpath.stop()
                dispatcher.fastpath = None
            if pair is not None:
                pair.stopped_by = wakeup.stop
            if wakeup.stop not in (RESTART_SIGNAL.name, pair_mod.DEMOTE):
                rules.remove(installation)
            if ownership is not None:
                ownership.close()
            if pid_file is not None:
                reload.remove_pid_file(pid_file)
            if ready_file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(ready_file)
    if wakeup.stop == RESTART_SIGNAL.name:  # a new worker takes over rules and table
        log.info("stopped for a restart; rules left in place (PPTP waits for the next worker)")
    else:
        log.info("stopped; rules removed")
    return 0


def _read_nat(policy: Policy, translator: PacketTranslator,
              dispatcher: Dispatcher) -> conntrack.Ctnetlink | None:
    """Give each control connection's NAT address (conntrack) to the translator; None
    when conntrack cannot be read: with one public address every call gets it (a
    warning), with several the worker cannot start (NateditError)."""
    if not isinstance(translator, Translator):
        return None
    try:
        ct = conntrack.Ctnetlink()
    except conntrack.ConntrackError as exc:
        if policy.other_public_addresses:
            raise NateditError(f"several public addresses need conntrack: {exc}") from exc
        log.warning("%s; every call gets %s", exc, policy.public_address)
        return None
    dispatcher.packets.read_nat(conntrack.NatAddresses(ct, dispatcher.counts), translator)
    return ct


def _loop(queues: list[Any], wakeup: _Wakeup, dispatcher: Dispatcher,
          on_hangup: Callable[[], None], verdicts: Iterable[nfqueue.Verdicts] = ()) -> None:
    """``verdicts``: each queue's batch its callback fills."""
    with contextlib.ExitStack() as readers:
        poller = select.epoll()
        readers.callback(poller.close)
        by_fd: dict[int, nfqueue.Reader | None] = {}
        for queue, batch in zip(queues, verdicts, strict=True):
            reader = nfqueue.Reader(queue, batch)
            readers.callback(reader.close)
            by_fd[queue.get_fd()] = reader
        by_fd[wakeup.fd] = None
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        poll, clock = poller.poll, dispatcher.clock
        gc.freeze()  # what start-up made is never collected: collections walk only the new
        while wakeup.stop is None:
            if wakeup.hangup:  # here, between two packets, not in the signal handler
                wakeup.hangup = False
                on_hangup()
            deadline = dispatcher.run_timers()
            timeout = -1.0 if deadline is None else max(0.0, deadline - clock())
            for fd, _ in poll(timeout):  # a signal's handler writes to wakeup.fd
                ready = by_fd[fd]
                if ready is None:
                    wakeup.drain()
                else:
                    ready.drain()  # at most nfqueue.BATCH packets (their verdicts
                    # sent), then the loop's turn
            dispatcher.flush()
        gc.unfreeze()
        log.info("%s received, stopping", wakeup.stop)


@contextlib.contextmanager
def _serving_events(name: str | None, hub: eventstream.EventHub) -> Iterator[None]:
    """The event stream on ``name`` for the duration of the block (None: not served)."""
    if name is None:
        yield
        return
    with eventstream.EventServer(name, hub):
        yield


class _Wakeup:
    """The self-pipe signals write to, so that a signal ends ``select`` at once."""

    def __init__(self, ignore: frozenset[int] = frozenset()) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ignore = ignore
        self.stop: str | None = None
        self.hangup = False
        """SIGHUP came: the loop reloads the policy."""

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in self.ignore:
            return
        if signum == signal.SIGHUP:
            self.hangup = True
        else:
            self.stop = pair_mod.signal_name(signum)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 512):
                pass

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._write_fd)


@contextlib.contextmanager
def _signals(ignore: frozenset[int] = frozenset()) -> Iterator[_Wakeup]:
    wakeup = _Wakeup(ignore)
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, RESTART_SIGNAL,
               pair_mod.PROMOTE_SIGNAL, pair_mod.DEMOTE_SIGNAL)
    old_fd = signal.set_wakeup_fd(wakeup._write_fd, warn_on_full_buffer=False)
    old = {signum: signal.signal(signum, wakeup.on_signal) for signum in handled}
    try:
        yield wakeup
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(old_fd)
        wakeup.close()


def _announce_ready(policy: Policy, flavour: rules.Flavour, ready_file: str | None,
                    status: PolicyStatus, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tell a harness, an operator and systemd that the rules are in and queues bound.

    Returns what the ready line says; the ready file has that and the policy status.
    """
    info: dict[str, Any] = {
        "pid": os.getpid(),
        "public_address": ",".join(str(a) for a in policy.public_addresses),
        "queue_outbound": policy.queue_outbound,
        "queue_inbound": policy.queue_inbound,
        "flavour": flavour.value,
        "datapath": policy.datapath.value,
        **(extra or {}),
    }
    if ready_file is not None:
        _write_ready_file(ready_file, {**info, "policy": reload.status_dict(status)})
    # Written whatever the log level: harnesses wait for this line.
    sys.stderr.write("natedit: ready " + " ".join(f"{k}={v}" for k, v in info.items()) + "\n")
    sys.stderr.flush()
    _sd_notify("READY=1")
    return info


def _write_ready_file(ready_file: str, content: dict[str, Any]) -> None:
    tmp = Path(f"{ready_file}.tmp")
    tmp.write_text(json.dumps(content) + "\n")
    tmp.replace(ready_file)


def _sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.sendto(message.encode(), address)
