"""What the kernel datapath put in a namespace: natedit's tc-BPF program and its maps,
found from the gateway's tc filters (BPF objects are not per namespace, so never by
name: other workers' maps may exist), read with bpftool."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from natedit.kernel.loader import PREF, PROGRAM

Exec = Callable[..., Any]
"""``lab.exec``: (namespace, argv, check=...) -> a CompletedProcess."""


def attached(exec_: Exec, ns: str) -> dict[str, int]:
    """Interface -> id of natedit's program on its ingress, in namespace ``ns``."""
    found: dict[str, int] = {}
    links = json.loads(exec_(ns, ["ip", "-j", "link", "show"]).stdout or "[]")
    for link in links:
        dev = link["ifname"]
        res = exec_(ns, ["tc", "-j", "filter", "show", "dev", dev, "ingress", "pref",
                         str(PREF)], check=False)
        if res.returncode != 0 or not res.stdout.strip():
            continue
        for f in json.loads(res.stdout):
            prog = f.get("options", {}).get("prog", {})
            if prog.get("name") == PROGRAM:
                found[dev] = int(prog["id"])
    return found


def kernel_maps(exec_: Exec, ns: str) -> dict[str, dict[tuple[object, ...], int]]:
    """{"in_daddr": key -> packets, "in_cid": the same keys, "out_saddr": ...}; {}: no
    program attached in ``ns``."""
    ids = set(attached(exec_, ns).values())
    if not ids:
        return {}
    prog = json.loads(exec_(ns, ["bpftool", "-j", "prog", "show", "id", str(min(ids))]).stdout)
    out: dict[str, dict[tuple[object, ...], int]] = {}
    for map_id in prog.get("map_ids", []):
        info = json.loads(exec_(ns, ["bpftool", "-j", "map", "show", "id", str(map_id)]).stdout)
        if info.get("name") not in ("natedit_in", "natedit_out"):
            continue
        dump = json.loads(exec_(ns, ["bpftool", "-j", "map", "dump", "id",
                                     str(map_id)]).stdout or "[]")
        shown = [e.get("formatted", e) for e in dump]  # with BTF: {"key": {...}, ...}
        elems = {tuple(e["key"].values()): int(e["value"]["packets"]) for e in shown
                 if isinstance(e.get("key"), dict)}
        if info["name"] == "natedit_in":
            out["in_daddr"], out["in_cid"] = elems, dict(elems)
        else:
            out["out_saddr"] = elems
    return out
