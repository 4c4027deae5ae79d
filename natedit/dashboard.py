"""natedit's Grafana dashboard, as code (grafana-foundation-sdk).

``deploy/grafana/dashboards/natedit.json`` is what :func:`build` returns,
encoded by :func:`render`; regenerate it with ``scripts/dev dashboard``
(``python -m natedit.dashboard --write``), never by hand:
``tests/unit/test_dashboard.py`` holds the committed file equal to the code.

Every query selects the gateways picked in the ``instance`` menu
(:func:`m`); tests/netns/test_e2e_metrics.py evaluates each of them against a real
Prometheus scraping a worker with real calls. The SDK is a dev extra
(``natedit[dev]``): the worker never imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "deploy" / "grafana" / "dashboards" / "natedit.json"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="natedit-prometheus")
RATE = "[$__rate_interval]"

Panel = stat.Panel | table.Panel | timeseries.Panel | bargauge.Panel
Steps = list[tuple[str, float | None]]
GREEN: Steps = [("green", None)]
POOL: Steps = [("green", None), ("orange", 0.75), ("red", 0.9)]


def m(metric: str) -> str:
    """``metric`` on the gateways picked in the ``instance`` menu."""
    return f'{metric}{{instance=~"$instance"}}'


def rate(metric: str, by: str = "") -> str:
    """Per-second rate of a counter, summed (``by`` labels kept)."""
    inner = f"rate({m(metric)}{RATE})"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def query(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
          table_format: bool = False) -> prom.Dataquery:
    q = (prom.Dataquery().datasource(DATASOURCE).expr(expr).legend_format(legend).ref_id(ref)
         .format(pm.PromQueryFormat.TABLE if table_format else pm.PromQueryFormat.TIME_SERIES))
    return q.instant() if instant else q.range()


def thresholds(steps: Steps) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(color=color, value=value) for color, value in steps])


def texts(**by_value: str) -> list[dm.ValueMapping]:
    """Value mappings: ``texts(**{"0": "DOWN"})`` shows 0 as DOWN."""
    return [dm.ValueMap(options={v: dm.ValueMappingResult(text=t) for v, t in by_value.items()})]


def single(title: str, expr: str, description: str = "", *, legend: str = "", unit: str = "short",
           steps: Steps = GREEN, background: bool = False, name: bool = False,
           mappings: list[dm.ValueMapping] | None = None, w: int = 4, h: int = 4) -> stat.Panel:
    """A stat panel: the last value of one query."""
    return (stat.Panel().title(title).description(description).datasource(DATASOURCE)
            .span(w).height(h).with_target(query(expr, legend)).unit(unit)
            .thresholds(thresholds(steps)).mappings(mappings or [])
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .color_mode(cm.BigValueColorMode.BACKGROUND if background
                        else cm.BigValueColorMode.VALUE)
            .graph_mode(cm.BigValueGraphMode.NONE)
            .text_mode(cm.BigValueTextMode.NAME if name else cm.BigValueTextMode.AUTO))


def graph(title: str, *targets: tuple[str, str], description: str = "", unit: str = "short",
          w: int = 12, h: int = 8) -> timeseries.Panel:
    """A time series panel of (expression, legend) targets, refIds A, B, ..."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
             .span(w).height(h).unit(unit).min(0)
             .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
                     .placement(cm.LegendPlacement.RIGHT).show_legend(True)
                     .calcs(["lastNotNull", "max"]).sort_by("Max").sort_desc(True))
             .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                      .sort(cm.SortOrder.DESCENDING))
             .draw_style(cm.GraphDrawStyle.LINE).line_width(1).fill_opacity(10)
             .show_points(cm.VisibilityMode.NEVER)
             .stacking(cb.StackingConfig().mode(cm.StackingMode.NONE).group("A")))
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


POOL_USAGE = (f"{m('natedit_call_ids_in_use')} / ignoring(public_address, server_address) "
              f"group_left {m('natedit_call_id_pool_size')}")
"""Fraction of each (public address, server) pool of public Call IDs in use."""

CALL_COLUMNS = {
    "instance": "Gateway", "client_address": "Client", "client_call_id": "Client Call ID",
    "server_address": "Server", "server_call_id": "Server Call ID",
    "public_address": "Public", "public_call_id": "Public Call ID", "state": "State",
}
"""natedit_call_info's labels as the table shows them, in order."""


def overview() -> list[Panel]:
    return [
        single("Worker up", m("up"), "Prometheus reached the worker's /metrics at the last scrape.",
               steps=[("red", None), ("green", 1)], background=True,
               mappings=texts(**{"0": "DOWN", "1": "UP"})),
        single("Live calls", f"sum({m('natedit_calls')})",
               "Calls in the mapping table, every state."),
        single("Control connections", f"sum({m('natedit_control_connections')})",
               "Tracked TCP 1723 conversations."),
        single("Clients", f"sum({m('natedit_clients')})",
               "Private addresses with at least one live call."),
        single("Fullest Call ID pool", f"max({POOL_USAGE})",
               "The most used (public address, server) pool of public Call IDs.",
               unit="percentunit", steps=POOL, background=True),
        single("Policy reload failed", f"max({m('natedit_policy_reload_failed')})",
               "1: the last reload was rejected; the previous policy stays in force.",
               steps=[("green", None), ("red", 1)], background=True,
               mappings=texts(**{"0": "no", "1": "FAILED"})),
    ]


def mapping_table() -> list[Panel]:
    calls = (table.Panel().title("Mapped calls").datasource(DATASOURCE).span(16).height(10)
             .description("One row per live call (natedit_call_info), at most the policy's "
                          "metrics.call_series; the rest is counted in 'Calls not listed'. "
                          "`natedit calls` on the gateway lists all of them.")
             .with_target(query(m("natedit_call_info"), instant=True, table_format=True))
             .show_header(True).cell_height(cm.TableCellHeight.SM).filterable(True)
             .align(cm.FieldTextAlignment.AUTO)
             .sort_by([cb.TableSortByFieldState().display_name("Client").desc(False)])
             .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
                 "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
                 "indexByName": {label: i for i, label in enumerate(CALL_COLUMNS)},
                 "renameByName": CALL_COLUMNS})))
    return [
        calls,
        single("Calls not listed", f"sum({m('natedit_call_info_omitted_calls')})",
               "Live calls left out of the table by the series cap (policy metrics.call_series).",
               steps=[("green", None), ("orange", 1)], background=True, h=10),
        single("Series cap", f"max({m('natedit_call_info_limit')})",
               "policy metrics.call_series", h=10),
    ]


def calls() -> list[Panel]:
    pools = (bargauge.Panel().title("Call ID pool usage per server").datasource(DATASOURCE)
             .description("Public Call IDs in use per (public address, server) over the pool "
                          "size (policy call_ids.first..call_ids.last).")
             .span(12).height(8)
             .with_target(query(POOL_USAGE, "{{server_address}} ({{public_address}})",
                                instant=True))
             .orientation(cm.VizOrientation.HORIZONTAL)
             .display_mode(cm.BarGaugeDisplayMode.GRADIENT).show_unfilled(True)
             .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .unit("percentunit").min(0).max(1).thresholds(thresholds(POOL)))
    return [
        graph("Call rates",
              (rate("natedit_calls_mapped_total"), "mapped"),
              (rate("natedit_calls_released_total", "reason"), "ended: {{reason}}"),
              (rate("natedit_calls_refused_total", "reason"), "refused: {{reason}}"),
              (rate("natedit_connections_refused_total", "reason"),
               "connection refused: {{reason}}"),
              description="Calls given a public Call ID, ended and refused, and control "
                          "connections the ACL refused, per second, by reason.", unit="ops"),
        graph("Live calls by state",
              (f"sum by (state) ({m('natedit_calls')})", "{{state}}"),
              (f"sum({m('natedit_control_connections')})", "control connections")),
        pools,
        graph("Call IDs in use per server",
              (m("natedit_call_ids_in_use"), "{{server_address}}"),
              (f"max({m('natedit_call_id_pool_size')})", "pool size")),
    ]


def gre() -> list[Panel]:
    return [
        graph("GRE packets", (rate("natedit_gre_packets_total", "direction"), "{{direction}}"),
              description="GRE packets natedit translated, per second.", unit="pps"),
        graph("GRE throughput",
              (f"8 * {rate('natedit_gre_bytes_total', 'direction')}", "{{direction}}"),
              description="Bits per second of translated GRE (IP headers included).", unit="bps"),
    ]


def drops() -> list[Panel]:
    return [
        graph("Dropped packets by reason",
              (rate("natedit_packets_dropped_total", "reason"), "{{reason}}"),
              description="Every packet natedit dropped, by reason (README: verdicts).",
              unit="pps"),
        graph("Passed untouched by reason",
              (rate("natedit_packets_passed_total", "reason"), "{{reason}}"),
              description="Packets natedit let through without rewriting, on purpose.",
              unit="pps"),
        graph("Malformed input by reason",
              (rate("natedit_malformed_packets_total", "reason, action"),
               "{{reason}} ({{action}})"),
              description="Packets that failed parsing or validation; action is what they got.",
              unit="pps"),
        graph("Worker errors", (rate("natedit_worker_errors_total", "kind"), "{{kind}}"),
              description="Exceptions in the worker (packet_error drops the packet).", unit="ops"),
    ]


def control() -> list[Panel]:
    return [
        graph("Control messages",
              (rate("natedit_control_messages_total", "direction, message_type"),
               "{{direction}} {{message_type}}"), unit="ops"),
        graph("Call ID rewrites",
              (rate("natedit_call_id_rewrites_total", "message_type, field"),
               "{{message_type}} {{field}}"),
              description="Call ID fields rewritten, by message type and field kind.", unit="ops"),
    ]


def queues() -> list[Panel]:
    return [
        graph("Packets queued to natedit",
              (rate("natedit_queue_packets_total", "queue, direction"), "{{queue}} {{direction}}"),
              description="Packets the kernel handed to each NFQUEUE.", unit="pps", w=8),
        graph("Queue length",
              (f"max by (queue, direction) ({m('natedit_queue_length')})",
               "{{queue}} {{direction}}"),
              (f"max({m('natedit_queue_length_max')})", "limit"),
              description="Packets waiting for the worker; at the limit the kernel drops.", w=8),
        graph("Kernel queue drops",
              (rate("natedit_queue_dropped_total", "queue, direction"),
               "full: {{queue}} {{direction}}"),
              (rate("natedit_queue_user_dropped_total", "queue, direction"),
               "netlink: {{queue}} {{direction}}"),
              description="Packets the kernel dropped: queue full, or netlink failed.",
              unit="pps", w=8),
        single("Queues bound", f"sum({m('natedit_queue_bound')})",
               "NFQUEUEs with a worker bound (2 when healthy).",
               steps=[("red", None), ("green", 2)], background=True),
        single("Event stream readers", f"sum({m('natedit_event_subscribers')})",
               "natedit events (and natedit calls --watch) readers now."),
        single("Events lost by slow readers",
               f"sum(increase({m('natedit_events_lost_total')}[$__range]))",
               "Call events a reader of the event stream was too slow to take, over the "
               "time range (its stream says where); the worker never waits for a reader.",
               steps=[("green", None), ("orange", 1)], background=True),
    ]


def datapath() -> list[Panel]:
    return [
        single("Datapath", f"max by (datapath) ({m('natedit_datapath')}) == 1",
               "Where established calls' GRE is translated (policy datapath): the kernel's "
               "tc-BPF program or the worker.", legend="{{datapath}}", name=True, w=4, h=8),
        single("Calls in the kernel maps", f"sum({m('natedit_kernel_calls')})",
               "Calls whose GRE the tc-BPF program translates (0 with datapath userspace).",
               w=4, h=8),
        graph("GRE translated in the kernel",
              (rate("natedit_kernel_gre_packets_total", "direction"), "{{direction}}"),
              description="GRE packets per second the tc-BPF program translated; the rest of "
              "natedit's GRE (GRE packets) went through the queue.", unit="pps", w=16),
    ]


def pair() -> list[Panel]:
    return [
        single("Pair role", f"max by (role) ({m('natedit_pair_role')}) == 1",
               "Each gateway's role in the pair (natedit run --follow): active, following, "
               "standby (cannot follow).", legend="{{role}}", name=True, w=4, h=8),
        single("Replica link", f"min({m('natedit_pair_replica_link_up')})",
               "The standby's Redis replica link to the active's (1: up).",
               steps=[("red", None), ("green", 1)], background=True,
               mappings=texts(**{"0": "DOWN", "1": "UP"}), w=4, h=8),
        graph("Replication lag",
              (f"max({m('natedit_pair_events_behind')})", "feed entries behind"),
              (f"max({m('natedit_pair_seconds_since_event')})", "seconds since last change"),
              description="How far the standby's followed table is behind its Redis replica.",
              w=8),
        graph("Promotions and demotions",
              (f"sum by (change) (increase({m('natedit_pair_role_changes_total')}{RATE}))",
               "{{change}}"), w=8),
    ]


PAIR_ROW = "Gateway pair"
"""Only a pair's workers export this row's figures (tests/netns/test_pair.py checks them)."""


def process() -> list[Panel]:
    return [
        graph("CPU", (f"rate({m('process_cpu_seconds_total')}{RATE})", "{{instance}}"),
              unit="percentunit", w=8),
        graph("Resident memory", (m("process_resident_memory_bytes"), "{{instance}}"),
              unit="bytes", w=8),
        graph("Policy reloads",
              (f"sum by (outcome) (increase({m('natedit_policy_reloads_total')}{RATE}))",
               "{{outcome}}"), w=8),
        single("Policy loaded", f"max({m('natedit_policy_loaded_timestamp_seconds')}) * 1000",
               "When the policy in force was loaded.", unit="dateTimeFromNow", w=6),
        single("Policy file", m("natedit_policy_info"),
               "The policy file in force (builtin: the built-in default).",
               legend="{{source}}", name=True, w=6),
        single("Version", m("natedit_build_info"), legend="{{version}}", name=True, w=6),
        single("Live calls limit", f"max({m('natedit_calls_limit')})", "policy limits.max_calls",
               w=6),
    ]


ROWS: dict[str, Callable[[], list[Panel]]] = {
    "Overview": overview,
    "Mapping table": mapping_table,
    "Calls": calls,
    "GRE": gre,
    "Drops and pass-throughs": drops,
    "Control conversation": control,
    "Queue health": queues,
    "Kernel datapath": datapath,
    PAIR_ROW: pair,
    "Process and policy": process,
}
"""The dashboard top to bottom: a row, then its panels, laid out left to right by the SDK."""


def build() -> db.Dashboard:
    dash = (db.Dashboard("natedit: PPTP NAT editor").uid("natedit")
            .description("natedit's worker: the mapping table, call and GRE rates, Call ID "
                         "pools, drops by reason, queue health.")
            .tags(["natedit", "pptp", "nat"]).timezone("browser").editable()
            .tooltip(dm.DashboardCursorSync.CROSSHAIR).refresh("30s").version(1)
            .time("now-1h", "now")
            .with_variable(db.QueryVariable("instance").label("Gateway").datasource(DATASOURCE)
                           .query("label_values(natedit_build_info, instance)")
                           .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
                           .include_all(True).multi(True).all_value(".*")
                           .sort(dm.VariableSort.ALPHABETICAL_ASC)
                           .current(dm.VariableOption(selected=True, text=["All"],
                                                      value=["$__all"]))))
    ids = iter(range(1, 1000))
    for title, panels in ROWS.items():
        dash = dash.with_row(db.Row(title).id(next(ids)))
        for panel in panels():
            dash = dash.with_panel(panel.id(next(ids)))
    return dash


def render() -> str:
    """The dashboard as the committed file holds it."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m natedit.dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true",
                        help="write the file (else: print it)")
    parser.add_argument("--output", type=Path, default=OUTPUT, metavar="PATH",
                        help="the file --write writes (default: the committed one)")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
