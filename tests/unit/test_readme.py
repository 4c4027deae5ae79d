"""Every command in the README is exercised by a test.

The commands are the lines of the README's ``sh`` code blocks (comments and a
leading ``sudo`` stripped). :data:`EXERCISED` maps each one to the tests that
run it (``path::test``, or a file that runs it, like .ci/run); a README
command with no entry fails :func:`test_every_readme_command_is_mapped`, an
entry naming a test that does not exist fails too. The cheap commands are
also run here, as written (or with the placeholders filled in), and every
``natedit`` synopsis is checked against the command's own ``--help``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from natedit import cli
from tests.unit.test_replay import conversation, write_pcap

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

EXERCISED: dict[str, tuple[str, ...]] = {
    # Install on a Debian gateway (the same script, staged with --root: the host untouched)
    "deploy/install.sh": (
        "tests/netns/test_install.py::test_layout",
        "tests/netns/test_install.py::test_second_run_changes_nothing_and_keeps_edits"),
    "natedit check-policy /etc/natedit/policy.yaml": (
        "tests/netns/test_install.py::test_installed_natedit_works",),
    # no systemd runs under CI: the unit is verified, its confinement reproduced
    "systemctl enable --now natedit": (
        "tests/netns/test_systemd.py::test_systemd_analyze_verify_accepts_the_unit",
        "tests/netns/test_install.py::test_installed_unit_verifies",
        "tests/netns/test_systemd.py::test_worker_runs_with_only_the_units_capabilities"),
    # Set-up: two commands
    "scripts/dev run": (
        "tests/netns/test_dev_script.py::test_dev_run_serves_until_sigterm_and_leaves_the_ruleset_clean",),
    "scripts/dev test": (".ci/run",),  # CI runs exactly this, from a clean clone
    "natedit run [--policy FILE] [--state FILE]": (
        "tests/netns/test_e2e_natedit.py::test_same_call_id_three_clients",
        "tests/netns/test_e2e_policy.py::test_reloads_under_traffic_lose_no_call",
        "tests/netns/test_e2e_restart.py::test_stop_and_restart_keep_live_calls"),
    "natedit check-policy FILE": (
        "tests/unit/test_policy.py::test_check_policy_of_the_deploy_example",
        "tests/unit/test_readme.py::test_check_policy_as_written"),
    "natedit reload [--ready-file PATH]": (
        "tests/netns/test_e2e_policy.py::test_reloads_under_traffic_lose_no_call",),
    "natedit rules [--flavour iptables|nft] [--policy FILE]": (
        "tests/unit/test_readme.py::test_rules_as_written",
        "tests/unit/test_deploy_files.py::test_rules_files_are_what_natedit_rules_prints"),
    "natedit replay IN.pcap OUT.pcap [--policy FILE] [--public-address A]": (
        "tests/unit/test_replay.py::test_replay_three_clients_same_call_id",
        "tests/unit/test_replay.py::test_replay_public_address_flag",
        "tests/unit/test_readme.py::test_replay_as_written"),
    "natedit calls [--metrics HOST:PORT] [--client A] [--server A] [--public A] [--state S] "
    "[--json] [--watch]": (
        "tests/netns/test_e2e_metrics.py::test_prometheus_scrapes_worker_with_real_calls",
        "tests/netns/test_lab_command.py::test_lab_runs_end_to_end_and_leaves_nothing",
        "tests/unit/test_readme.py::test_calls_without_a_worker",
        "tests/unit/test_calls_command.py::test_filters",
        "tests/unit/test_calls_command.py::test_json",
        "tests/unit/test_calls_command.py::test_watch_prints_the_table_then_the_events"),
    "natedit events [--json] [--client A] [--server A] [--public A] [--state S]": (
        "tests/netns/test_e2e_metrics.py::test_prometheus_scrapes_worker_with_real_calls",
        "tests/unit/test_eventstream.py::test_slow_subscriber_loses_events_fast_one_gets_all",
        "tests/unit/test_eventstream.py::test_follow_prints_text_filters_and_stops",
        "tests/unit/test_eventstream.py::test_events_without_a_worker"),
    "natedit cleanup": (
        "tests/netns/test_worker_netns.py::test_fail_closed_crash_restart_and_cleanup",
        "tests/netns/test_deploy_files_netns.py::test_iptables_file_loads_and_natedit_cleanup_removes_it"),
    "natedit lab [--clients N] [--duration S]": (
        "tests/netns/test_lab_command.py::test_lab_runs_end_to_end_and_leaves_nothing",),
    "scripts/dev bench": ("tests/netns/test_dev_script.py::test_bench_prints_progress_per_figure",),
    "scripts/dev datapath": ("tests/netns/test_datapath_bench.py::test_datapath_bench_short_run",),
    "scripts/dev setups": ("tests/netns/test_setups_bench.py::test_setups_bench_short_run",),
    "scripts/dev dashboard": ("tests/unit/test_dashboard.py::test_dev_dashboard_writes_the_file",),
    # the long checks, CI-sized (bench.fuzz and bench.soak, as scripts/dev runs them)
    "scripts/dev fuzz [--inputs N]": (
        "tests/unit/test_fuzz_seeded.py::test_short_random_fuzz_run",),
    "scripts/dev soak [--minutes M]": ("tests/netns/test_soak_quick.py::test_short_soak",),
    # Try it: natedit lab
    "natedit lab": ("tests/netns/test_lab_command.py::test_lab_runs_end_to_end_and_leaves_nothing",
                    "tests/netns/test_lab_command.py::test_not_root"),
    "natedit lab --clients 5 --duration 0 --call-id 0x4242": (
        "tests/netns/test_lab_command.py::test_lab_interrupted_removes_everything",
        "tests/unit/test_readme.py::test_lab_options_as_written"),
    "natedit lab --clients 2 --duration 8 --port-forward": (
        "tests/netns/test_lab_command.py::test_lab_port_forward_leaves_the_published_servers_calls_alone",
        "tests/unit/test_readme.py::test_lab_options_as_written"),
    # Running under systemd
    "systemctl reload natedit": (
        "tests/netns/test_systemd.py::test_unit_asks_for_what_the_worker_needs_and_no_more",
        "tests/netns/test_systemd.py::test_worker_runs_with_only_the_units_capabilities"),
    "journalctl -u natedit -f": (
        "tests/unit/test_logging.py::test_each_call_event_is_one_structured_line",
        "tests/unit/test_logging.py::test_each_reload_is_one_structured_line"),
    # Running a pair
    "natedit run --follow --state redis://HOST:PORT/DB [--policy FILE]": (
        "tests/netns/test_pair.py::test_failover_keeps_every_call",
        "tests/unit/test_redisstate.py::test_a_follower_on_a_replica_keeps_a_warm_copy"),
    "natedit promote [--ready-file PATH]": (
        "tests/netns/test_pair.py::test_failover_keeps_every_call",),
    "natedit demote [--ready-file PATH]": (
        "tests/netns/test_pair.py::test_failover_keeps_every_call",),
}
"""README command -> the tests that run it (what journald shows is natedit's stderr)."""


def readme_commands() -> list[str]:
    """Each line of the README's ``sh`` blocks, without its comment or ``sudo``."""
    text = README.read_text()
    commands = []
    for body in re.findall(r"(?ms)^```sh\n(.*?)^```", text):
        for line in body.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command.removeprefix("sudo "))
    return commands


def test_every_readme_command_is_mapped() -> None:
    commands = readme_commands()
    assert len(commands) >= 15, commands
    unmapped = [c for c in commands if c not in EXERCISED]
    assert not unmapped, f"README commands without a test: {unmapped}"
    stale = [c for c in EXERCISED if c not in commands]
    assert not stale, f"mapped commands no longer in the README: {stale}"


@pytest.mark.parametrize("command", list(EXERCISED))
def test_mapped_tests_exist(command: str) -> None:
    for ref in EXERCISED[command]:
        path, _, name = ref.partition("::")
        source = (REPO / path).read_text()
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), ref
    if command == "scripts/dev test":
        assert "exec scripts/dev test" in (REPO / ".ci/run").read_text()


def test_readme_code_blocks_are_closed() -> None:
    assert README.read_text().count("```") % 2 == 0


# -- the cheap ones, run here ---------------------------------------------------------------


def natedit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "natedit", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("command", [c for c in EXERCISED if c.startswith("natedit ")])
def test_synopsis_matches_the_help(command: str) -> None:
    """Every option a README synopsis shows is one the command takes."""
    words = command.split()
    done = natedit(words[1], "--help")
    assert done.returncode == 0, done.stderr
    for option in re.findall(r"--[a-z-]+", command):
        assert option in done.stdout, (command, option)


def test_check_policy_as_written() -> None:
    done = natedit("check-policy", "deploy/policy.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith("valid; above, the effective policy (defaults filled in)\n")
    assert "max_calls_per_client: 256" in done.stdout


@pytest.mark.parametrize("flavour", ["iptables", "nft"])
def test_rules_as_written(flavour: str) -> None:
    done = natedit("rules", "--flavour", flavour, "--policy", "deploy/policy.yaml",
                   "--public-address", "198.51.100.1")
    assert done.returncode == 0, done.stderr
    assert ("NATEDIT-FORWARD" if flavour == "iptables" else "table ip natedit") in done.stdout


def test_replay_as_written(tmp_path: Path) -> None:
    src, dst, policy = tmp_path / "in.pcap", tmp_path / "out.pcap", tmp_path / "policy.yaml"
    write_pcap(src, conversation())
    policy.write_text("public_address: 198.51.100.1\n")
    done = natedit("replay", str(src), str(dst), "--policy", str(policy))
    assert done.returncode == 0, done.stderr
    assert "calls mapped 3" in done.stdout + done.stderr
    assert dst.stat().st_size > 0


def test_calls_without_a_worker() -> None:
    done = natedit("calls", "--metrics", "127.0.0.1:1")
    assert done.returncode == 1
    assert done.stderr.startswith("natedit: error: no natedit worker answers at "
                                  "http://127.0.0.1:1/calls")


def test_lab_options_as_written() -> None:
    args = cli.build_parser().parse_args(
        ["lab", "--clients", "5", "--duration", "0", "--call-id", "0x4242"])
    assert (args.clients, args.duration, args.call_id) == (5, 0.0, 0x4242)
    assert not args.port_forward
    args = cli.build_parser().parse_args(
        ["lab", "--clients", "2", "--duration", "8", "--port-forward"])
    assert (args.clients, args.duration, args.port_forward) == (2, 8.0, True)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["lab", "--call-id", "0x10000"])
