"""The ``natedit`` command: run, reload, promote, demote, check-policy, rules, cleanup, replay,
calls, events, lab.

Errors natedit expects (a bad policy, not root, a queue in use, a command
that failed) print one line ``natedit: error: ...`` and exit 1; usage
errors exit 2 (argparse). ``check-policy`` and ``reload`` print every
problem of a policy on a line of its own instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

from . import LOG_LEVELS, NateditError, Policy, PolicyError, host, logs, reload, rules, state
from .eventstream import DEFAULT_SOCKET, Filter
from .policyfile import dump_policy, load_policy, read_policy
from .status import PolicyStatus

RELOAD_WAIT = 10.0
"""Seconds ``natedit reload`` waits for the worker to report the outcome."""


def _cmd_run(args: argparse.Namespace) -> int:
    from . import worker

    if not host.has_capability(host.CAP_NET_ADMIN):
        raise NateditError(
            "natedit run needs root or CAP_NET_ADMIN (deploy/systemd/natedit.service): "
            "it installs firewall rules and binds netfilter queues"
        )
    policy = load_policy(args.policy)
    logs.setup(args.log_level or policy.log_level, policy.log_format)

    def on_reload(new: Policy) -> None:
        logs.setup(args.log_level or new.log_level, new.log_format)

    status = PolicyStatus(source=args.policy, loaded_at=time.time())
    run = worker.run
    if args.follow or args.state.startswith(("redis://", "rediss://", "unix://")):  # a pair
        from . import pair

        run = functools.partial(pair.run, follow=args.follow)
    return run(policy, flavour=rules.Flavour(args.flavour), ready_file=args.ready_file,
               policy_status=status, policy_path=args.policy,
               pid_file=args.pid_file or None, on_reload=on_reload,
               state_path=args.state or None,
               events_socket=args.events_socket or None)


def _cmd_promote(args: argparse.Namespace) -> int:
    from . import pair

    return pair.ask(args.pid_file, args.ready_file, promote=args.command == "promote",
                    wait=args.wait)


def _cmd_check_policy(args: argparse.Namespace) -> int:
    try:
        loaded = read_policy(args.file)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        n = len(exc.problems)
        print(f"natedit: {args.file}: {n} problem{'s' if n > 1 else ''}, not a valid policy",
              file=sys.stderr)
        return 1
    sys.stdout.write(dump_policy(loaded.policy))
    print(f"natedit: {args.file}: valid; above, the effective policy (defaults filled in)",
          file=sys.stderr)
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    if args.ready_file is None:
        pid = reload.read_pid(args.pid_file)
        reload.signal_worker(pid, args.pid_file)
        print(f"natedit: asked natedit (pid {pid}) to reload its policy; its log says how "
              "it went (with --ready-file, natedit reload waits for the outcome)",
              file=sys.stderr)
        return 0
    pid, before = _ready_status(args.ready_file)
    reload.signal_worker(pid, args.ready_file)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        _, after = _ready_status(args.ready_file)
        if after["reloads_failed"] != before["reloads_failed"]:
            for problem in str(after["last_error"] or "").splitlines():
                print(problem, file=sys.stderr)
            print(f"natedit: reload rejected by natedit (pid {pid}); the running policy stays",
                  file=sys.stderr)
            return 1
        if after["reloads_ok"] != before["reloads_ok"]:
            print(f"natedit: policy reloaded by natedit (pid {pid}) from "
                  f"{after['source'] or reload.BUILT_IN}", file=sys.stderr)
            return 0
        time.sleep(0.05)
    raise NateditError(f"natedit (pid {pid}) did not report a reload within {args.wait:g} s")


def _ready_status(path: str) -> tuple[int, dict[str, Any]]:
    """The PID and the policy status a worker's ready file holds."""
    try:
        with open(path) as f:
            info = json.load(f)
        pid, status = info["pid"], info["policy"]
        if not isinstance(pid, int) or not isinstance(status, dict):
            raise ValueError("no pid or policy status")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NateditError(f"cannot read {path} ({exc}): is natedit running?") from exc
    return pid, status


def _cmd_rules(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    if args.public_address is not None:
        policy = policy.with_public_address(args.public_address)
    else:
        policy = policy.with_public_address(host.public_address(policy))
    ruleset = rules.build_ruleset(policy)
    if args.native and args.flavour != "iptables":
        raise NateditError("--native is the iptables flavour's table ip natedit "
                           "(the nft flavour prints it whole)")
    render = (rules.render_native if args.native else
              rules.render_nft if args.flavour == "nft" else rules.render_iptables)
    sys.stdout.write(render(ruleset))
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from . import fastpath

    rules.cleanup()
    fastpath.remove_leftover()  # tc-BPF filters, and the pins of workers that are gone
    return 0


def _cmd_calls(args: argparse.Namespace) -> int:
    from . import eventstream, metrics, view

    where = args.metrics or load_policy(args.policy).metrics_listen
    match = _filter(args)
    rows = [c for c in metrics.fetch_calls_json(where) if match.matches(c)]
    if args.json:
        sys.stdout.writelines(json.dumps(c) + "\n" for c in rows)
    else:
        sys.stdout.write(view.format_calls([metrics.call_info(c) for c in rows]) + "\n")
    sys.stdout.flush()
    print(f"natedit: {len(rows)} calls", file=sys.stderr)
    if not args.watch:
        return 0
    return eventstream.follow(args.events_socket, json_lines=args.json, where=match)


def _cmd_events(args: argparse.Namespace) -> int:
    from . import eventstream

    return eventstream.follow(args.socket, json_lines=args.json, where=_filter(args),
                              count=args.count)


def _filter(args: argparse.Namespace) -> Filter:
    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return Filter(client=text(args.client), server=text(args.server),
                  public=text(args.public), state=args.state)


def _filter_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--client, --server, --public, --state: like conntrack's -s, -d, --state."""
    from . import CallState

    for flag, whose in (("--client", "private address"), ("--server", "server's address"),
                        ("--public", "public address")):
        parser.add_argument(flag, type=IPv4Address, metavar="A",
                            help=f"only {what} with this {whose}")
    parser.add_argument("--state", choices=[s.value for s in CallState],
                        help=f"only {what} in this state")


def _cmd_lab(args: argparse.Namespace) -> int:
    from .lab import demo

    return demo.main(args.clients, args.duration, args.call_id, args.interval,
                     port_forward=args.port_forward)


def _call_id(text: str) -> int:
    value = int(text, 0)
    if not 1 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"expected 1 to 65535 (0x1 to 0xffff), found {text}")
    return value


def _clients(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError(f"expected 1 to 200, found {text}")
    return value


def _cmd_replay(args: argparse.Namespace) -> int:
    from . import replay

    return replay.main(args.input, args.output, args.policy, args.public_address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natedit", description="PPTP NAT editor: Call ID translation over NFQUEUE."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flavours = [f.value for f in rules.Flavour]
    events_default = DEFAULT_SOCKET

    run = sub.add_parser("run", help="install the rules and serve the queues until SIGTERM")
    run.add_argument("--policy", metavar="FILE", help="policy YAML (default: built-in)")
    run.add_argument(
        "--flavour", choices=flavours, default="iptables",
        help="rule flavour (default iptables: nft needs CONFIG_NFT_QUEUE)",
    )  # fmt: skip
    run.add_argument(
        "--ready-file", metavar="PATH",
        help="write this JSON file once ready; removed at a clean stop",
    )  # fmt: skip
    run.add_argument(
        "--pid-file", metavar="PATH", default=reload.DEFAULT_PID_FILE,
        help=f"write the PID here while running (default {reload.DEFAULT_PID_FILE}; '' for none)",
    )  # fmt: skip
    run.add_argument(
        "--state", metavar="FILE", default=state.DEFAULT_STATE_FILE,
        help="keep the call table here across restarts (SQLite; default "
             f"{state.DEFAULT_STATE_FILE}; '' for none), or in Redis: redis://HOST:PORT/DB "
             "(a gateway pair, natedit.pair)",
    )  # fmt: skip
    run.add_argument("--follow", action="store_true",
                     help="start as the standby of a pair: follow the table in --state "
                          "redis://..., translate nothing until natedit promote")
    run.add_argument(
        "--events-socket", metavar="NAME", default=events_default,
        help=f"serve the call events here (natedit events; default {events_default}, "
             "@: abstract, per network namespace; '' for none)",
    )  # fmt: skip
    run.add_argument("--log-level", choices=LOG_LEVELS,
                     help="overrides the policy's logging.level (also across reloads)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser(
        "check-policy", help="validate a policy file and print the effective policy")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=_cmd_check_policy)

    rel = sub.add_parser("reload", help="make the running worker read its policy file again")
    rel.add_argument(
        "--pid-file", metavar="PATH", default=reload.DEFAULT_PID_FILE,
        help=f"the worker's PID file (default {reload.DEFAULT_PID_FILE})",
    )  # fmt: skip
    rel.add_argument(
        "--ready-file", metavar="PATH",
        help="the worker's --ready-file: find it there and wait for the outcome",
    )  # fmt: skip
    rel.add_argument("--wait", type=float, default=RELOAD_WAIT, metavar="SECONDS",
                     help=f"how long to wait for the outcome (default {RELOAD_WAIT:g})")
    rel.set_defaults(func=_cmd_reload)

    for verb, what in (("promote", "make a following worker take the table and translate"),
                       ("demote", "make an active worker of a pair stop and follow again")):
        role = sub.add_parser(verb, help=what)
        role.add_argument(
            "--pid-file", metavar="PATH", default=reload.DEFAULT_PID_FILE,
            help=f"the worker's PID file (default {reload.DEFAULT_PID_FILE})",
        )  # fmt: skip
        role.add_argument("--ready-file", metavar="PATH",
                          help="the worker's --ready-file: find it there, wait for the outcome")
        role.add_argument("--wait", type=float, default=RELOAD_WAIT, metavar="SECONDS",
                          help=f"how long to wait for the outcome (default {RELOAD_WAIT:g})")
        role.set_defaults(func=_cmd_promote)

    show = sub.add_parser("rules", help="print the firewall rules for a policy")
    show.add_argument("--policy", metavar="FILE", help="policy YAML (default: built-in)")
    show.add_argument("--flavour", choices=flavours, default="iptables")
    show.add_argument(
        "--public-address", type=IPv4Address, metavar="ADDR",
        help="instead of the policy's, or the default route's",
    )  # fmt: skip
    show.add_argument(
        "--native", action="store_true",
        help="the iptables flavour's nftables part (table ip natedit: the ownership sets "
             "and the chains that claim natedit's GRE), to load before its iptables part",
    )  # fmt: skip
    show.set_defaults(func=_cmd_rules)

    clean = sub.add_parser("cleanup", help="remove every rule a natedit run left behind")
    clean.set_defaults(func=_cmd_cleanup)

    calls = sub.add_parser("calls", help="list the running worker's calls (like conntrack -L)")
    calls.add_argument(
        "--metrics", metavar="URL",
        help="the worker's metrics endpoint (default: the policy's metrics_listen)",
    )  # fmt: skip
    calls.add_argument("--policy", metavar="FILE", help="policy YAML (default: built-in)")
    _filter_options(calls, "calls")
    calls.add_argument("--json", action="store_true",
                       help="one JSON object per call (per event with --watch)")
    calls.add_argument("--watch", action="store_true",
                       help="then follow the call events, like natedit events")
    calls.add_argument("--events-socket", metavar="NAME", default=events_default,
                       help=f"where --watch reads the events (default {events_default})")
    calls.set_defaults(func=_cmd_calls)

    events = sub.add_parser(
        "events", help="follow the running worker's call events (like conntrack -E)",
        description="One line per call event of the running worker, as it happens, until "
        "Ctrl-C or the worker stops (exit 1). A reader too slow for the worker loses "
        "events: an events_lost line says how many, where.")
    events.add_argument("--socket", metavar="NAME", default=events_default,
                        help=f"the worker's --events-socket (default {events_default})")
    _filter_options(events, "events")
    events.add_argument("--json", action="store_true", help="one JSON object per event")
    events.add_argument("--count", type=int, metavar="N", help="stop after N events")
    events.set_defaults(func=_cmd_events)

    lab = sub.add_parser(
        "lab", help="natedit with real pptpd and pptp-linux peers in throw-away namespaces",
        description="Build a throw-away gateway in network namespaces (root), run natedit "
        "on the built-in policy between pptpd and N pptp-linux clients forced onto one "
        "Call ID, show the call table and metrics while frames flow, remove it all on "
        "exit or Ctrl-C.")
    lab.add_argument("--clients", type=_clients, default=3, metavar="N",
                     help="pptp-linux clients, 1 to 200 (default 3)")
    lab.add_argument("--duration", type=float, default=20.0, metavar="SECONDS",
                     help="how long frames flow (default 20; 0: until Ctrl-C)")
    lab.add_argument("--call-id", type=_call_id, default=0x1234, metavar="ID",
                     help="the private Call ID every client is forced onto (default 0x1234)")
    lab.add_argument("--interval", type=float, default=3.0, metavar="SECONDS",
                     help="seconds between two views of the call table (default 3)")
    lab.add_argument("--port-forward", action="store_true",
                     help="also an inside pptpd published on the public address by DNAT, "
                     "called by 2 outside clients and 2 behind one remote NAT (natedit "
                     "must leave those calls alone)")
    lab.set_defaults(func=_cmd_lab)

    replay = sub.add_parser("replay", help="translate a pcap offline")
    replay.add_argument("input", metavar="IN.pcap")
    replay.add_argument("output", metavar="OUT.pcap")
    replay.add_argument("--policy", metavar="FILE", help="policy YAML (default: built-in)")
    replay.add_argument(
        "--public-address", type=IPv4Address, metavar="A",
        help="the address the clients share (default: the policy's, else the destination "
             "of the capture's first GRE from outside)",
    )  # fmt: skip
    replay.set_defaults(func=_cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (NateditError, OSError) as exc:
        message = "; ".join(line for line in str(exc).splitlines() if line.strip())
        print(f"natedit: error: {message}", file=sys.stderr)
        return 1
    return status
