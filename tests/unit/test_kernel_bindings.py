"""natedit.kernel without the kernel: the C structs of gre.bpf.c as the bindings pack
them, the program's source as it is shipped, the loader's one-line refusals."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from natedit import host
from natedit.core.errors import NateditError
from natedit.kernel import libbpf, loader

SOURCE = loader.SOURCE.read_text()


def test_keys_and_values_have_the_c_layout() -> None:
    assert (libbpf.IN_KEY.size, libbpf.OUT_KEY.size, libbpf.ROUTE.size) == (12, 12, 24)
    server, client = IPv4Address("198.51.100.2").packed, IPv4Address("10.0.0.11").packed
    public = IPv4Address("198.51.100.1").packed
    # addresses and Call IDs in network order, as the program reads them off the wire
    assert libbpf.pack_in_key(public, server, 0x1234) == public + server + b"\x12\x34\0\0"
    assert libbpf.pack_out_key(client, server, 0x0100) == client + server + b"\x01\x00\0\0"
    value = libbpf.pack_route(client, 0x1234)
    assert value[:6] == client + b"\x12\x34" and value[8:] == bytes(16)  # counters zero
    assert libbpf.unpack_route(value) == (client, 0x1234, 0, 0)


def test_the_source_declares_what_the_bindings_and_loader_expect() -> None:
    for name in loader.MAPS:
        assert re.search(rf"}} {name} SEC\(\"\.maps\"\);", SOURCE), name
    assert f"int {loader.PROGRAM}(struct __sk_buff *skb)" in SOURCE
    assert "bpf_skb_pull_data" in SOURCE and "bpf_fib_lookup" in SOURCE
    assert "pyproject" not in SOURCE and Path(loader.SOURCE).suffix == ".c"
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"natedit.kernel" = ["*.bpf.c"]' in pyproject  # shipped as source


def test_no_clang_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "have", lambda program: program != "clang")
    with pytest.raises(loader.KernelDatapathUnavailable, match="needs clang") as err:
        loader.build()
    assert "\n" not in str(err.value) and issubclass(err.type, NateditError)


def test_bpf_not_permitted_is_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    def refuse(argv: list[str], **_: object) -> str:
        raise host.HostError("bpftool prog load: Operation not permitted")

    monkeypatch.setattr(host, "have", lambda program: True)
    monkeypatch.setattr(host, "run", refuse)
    with pytest.raises(loader.KernelDatapathUnavailable, match="BPF is not permitted") as err:
        loader.load(tmp_path / "x.o", IPv4Address("198.51.100.1"), ["out0"], root=tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "natedit" / "x").exists()


def test_interfaces_are_the_public_one_and_those_routing_inside(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        ("addr",): '[{"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}]},'
                   ' {"ifname": "out0", "addr_info": [{"local": "198.51.100.1"}]},'
                   ' {"ifname": "in0", "addr_info": [{"local": "10.0.0.1"}]}]',
        ("route", "10.0.0.0/24"): '[{"dst": "default", "dev": "out0"},'
                                   ' {"dst": "10.0.0.0/24", "dev": "in0"}]',
        ("route", "10.1.0.0/16"): '[{"dst": "10.1.2.0/24", "dev": "in1"}]',
    }

    def run(argv: list[str], **_: object) -> str:
        if "addr" in argv:
            return answers[("addr",)]
        return answers[("route", argv[-1])]

    monkeypatch.setattr(host, "run", run)
    found = loader.find_interfaces(IPv4Address("198.51.100.1"),
                                   (IPv4Network("10.0.0.0/24"), IPv4Network("10.1.0.0/16")),
                                   None)
    assert found == ["out0", "in0", "in1"]


def test_pins_of_gone_workers_are_reclaimed(tmp_path: Path) -> None:
    base = tmp_path / "natedit"
    (base / "1").mkdir(parents=True)  # init: alive
    (base / "999999999").mkdir()  # no such process
    assert loader.reclaim(base) == ["999999999"]
    assert sorted(p.name for p in base.iterdir()) == ["1"]


def _status(*bits: int) -> str:
    return f"Name:\tnatedit\nCapEff:\t{sum(1 << b for b in bits):016x}\n"


def test_the_start_up_probe_names_the_missing_capability_in_one_line() -> None:
    allowed = lambda: (True, "")  # noqa: E731 (the kernel's answer is not asked for)
    with pytest.raises(loader.KernelDatapathUnavailable) as err:
        loader.probe(_status(loader.CAP_NET_ADMIN), allowed)
    assert str(err.value) == ("datapath kernel: BPF is not permitted: the worker lacks CAP_BPF "
                              "(or CAP_SYS_ADMIN) (datapath: userspace works without it)")
    with pytest.raises(loader.KernelDatapathUnavailable, match="lacks CAP_NET_ADMIN "):
        loader.probe(_status(loader.CAP_BPF), allowed)
    with pytest.raises(loader.KernelDatapathUnavailable,
                       match=re.escape("lacks CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN")):
        loader.probe(_status(), allowed)
    for enough in (_status(loader.CAP_BPF, loader.CAP_NET_ADMIN),
                   _status(loader.CAP_SYS_ADMIN, loader.CAP_NET_ADMIN)):
        loader.probe(enough, allowed)  # nothing raised


def test_a_kernel_that_cannot_load_tc_programs_is_one_clear_line() -> None:
    with pytest.raises(loader.KernelDatapathUnavailable) as err:
        loader.probe(_status(loader.CAP_BPF, loader.CAP_NET_ADMIN),
                     lambda: (False, "Invalid argument"))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("datapath kernel: this kernel does not let natedit load a "
                                     "tc BPF program (BPF_PROG_TYPE_SCHED_CLS: Invalid argument;")
