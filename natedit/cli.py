"""The ``natedit`` command: run, rules, cleanup, replay, calls.

Errors natedit expects (a bad policy, not root, a queue in use, a command
that failed) print one line ``natedit: error: ...`` and exit 1; usage
errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address

from . import host, rules
from ._errors import NateditError
from ._policy import load_policy
from .status import PolicyStatus

LOG_LEVELS = ("debug", "info", "warning", "error")


class _Formatter(logging.Formatter):
    """``natedit: message``; ``natedit: warning: message`` from WARNING up."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"natedit: {record.levelname.lower()}: {text}"
        return f"natedit: {text}"


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    logger = logging.getLogger("natedit")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def _cmd_run(args: argparse.Namespace) -> int:
    from . import worker

    if os.geteuid() != 0:
        raise NateditError(
            "natedit run needs root (CAP_NET_ADMIN): it installs firewall rules "
            "and binds netfilter queues"
        )
    policy = load_policy(args.policy)
    _setup_logging(args.log_level or policy.log_level)
    status = PolicyStatus(source=args.policy, loaded_at=time.time())
    return worker.run(policy, flavour=rules.Flavour(args.flavour), ready_file=args.ready_file,
                      policy_status=status)


def _cmd_rules(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    if args.public_address is not None:
        policy = policy.with_public_address(args.public_address)
    elif policy.public_address is None:
        policy = policy.with_public_address(host.default_route_address())
    ruleset = rules.build_ruleset(policy)
    render = rules.render_nft if args.flavour == "nft" else rules.render_iptables
    sys.stdout.write(render(ruleset))
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    rules.cleanup()
    return 0


def _cmd_calls(args: argparse.Namespace) -> int:
    from . import metrics, view

    where = args.metrics or load_policy(args.policy).metrics_listen
    calls = metrics.fetch_calls(where)
    sys.stdout.write(view.format_calls(calls) + "\n")
    print(f"natedit: {len(calls)} calls", file=sys.stderr)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from . import replay

    return replay.main(args.input, args.output, args.policy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natedit", description="PPTP NAT editor: Call ID translation over NFQUEUE."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flavours = [f.value for f in rules.Flavour]

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
    run.add_argument("--log-level", choices=LOG_LEVELS, help="overrides the policy's log_level")
    run.set_defaults(func=_cmd_run)

    show = sub.add_parser("rules", help="print the firewall rules for a policy")
    show.add_argument("--policy", metavar="FILE", help="policy YAML (default: built-in)")
    show.add_argument("--flavour", choices=flavours, default="iptables")
    show.add_argument(
        "--public-address", type=IPv4Address, metavar="ADDR",
        help="instead of the policy's, or the default route's",
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
    calls.set_defaults(func=_cmd_calls)

    replay = sub.add_parser("replay", help="translate a pcap offline")
    replay.add_argument("input", metavar="IN.pcap")
    replay.add_argument("output", metavar="OUT.pcap")
    replay.add_argument("--policy", metavar="FILE", help="policy YAML (default: built-in)")
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
