"""libbpf through ctypes: the map calls the kernel datapath makes, in this process.

Only the low-level wrappers of ``bpf(2)`` (``bpf_obj_get``, ``bpf_map_update_elem``,
``bpf_map_delete_elem``, ``bpf_map_lookup_elem``, ``bpf_map_get_next_key``): no
process per element. Keys and values are the C structs of gre.bpf.c, packed here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator

from .. import NateditError

IN_KEY = struct.Struct("!4s4sHxx")
"""struct in_key: public address, server, public Call ID (network order), pad."""
OUT_KEY = struct.Struct("!4s4sHxx")
"""struct out_key: client, server, server Call ID."""
ROUTE = struct.Struct("=4s2sxxQQ")
"""struct route: address, Call ID (network order bytes), pad, packets, bytes (host order)."""
BPF_ANY = 0
BPF_PROG_TYPE_SCHED_CLS = 3


class BpfError(NateditError):
    """A bpf(2) call failed."""


def pack_in_key(public: bytes, server: bytes, public_call_id: int) -> bytes:
    return IN_KEY.pack(public, server, public_call_id)


def pack_out_key(client: bytes, server: bytes, server_call_id: int) -> bytes:
    return OUT_KEY.pack(client, server, server_call_id)


def pack_route(address: bytes, call_id: int) -> bytes:
    """A fresh value: counters at zero."""
    return ROUTE.pack(address, call_id.to_bytes(2, "big"), 0, 0)


def unpack_route(value: bytes) -> tuple[bytes, int, int, int]:
    """(address, Call ID, packets, bytes)."""
    address, cid, packets, nbytes = ROUTE.unpack(value)
    return address, int.from_bytes(cid, "big"), packets, nbytes


class Libbpf:
    """The library, loaded once; raises BpfError when it is not installed."""

    def __init__(self, name: str | None = None) -> None:
        path = name or ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError as exc:
            raise BpfError(f"datapath kernel needs libbpf ({exc}; Debian: apt-get install "
                           "libbpf1)") from exc
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.bpf_obj_get.restype = ctypes.c_int
        for fn in (lib.bpf_map_update_elem,):
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
            fn.restype = ctypes.c_int
        for fn in (lib.bpf_map_lookup_elem, lib.bpf_map_get_next_key):
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_int
        lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.bpf_map_delete_elem.restype = ctypes.c_int
        self.lib = lib

    def can_load_tc_programs(self) -> tuple[bool, str]:
        """Whether this kernel lets this process load a tc (SCHED_CLS) program: libbpf
        loads a two-instruction one and drops it. (False, why) when it cannot."""
        probe = self.lib.libbpf_probe_bpf_prog_type
        probe.argtypes = [ctypes.c_int, ctypes.c_void_p]
        probe.restype = ctypes.c_int
        ctypes.set_errno(0)
        rc = probe(BPF_PROG_TYPE_SCHED_CLS, None)
        err = ctypes.get_errno() or (-rc if rc < 0 else 0)
        return rc == 1, os.strerror(err) if err else "not supported"

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            err = ctypes.get_errno() or -rc
            raise BpfError(f"{what}: {os.strerror(err)}")
        return rc

    def obj_get(self, path: str) -> int:
        return self._check(self.lib.bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


class Map:
    """One map, opened by its pin; keys and values are bytes of the C structs."""

    def __init__(self, lib: Libbpf, path: str, key_size: int, value_size: int) -> None:
        self._lib = lib
        self.path = path
        self.key_size, self.value_size = key_size, value_size
        self.fd: int | None = lib.obj_get(path)

    def _fd(self) -> int:
        if self.fd is None:
            raise BpfError(f"{self.path}: closed")
        return self.fd

    def update(self, key: bytes, value: bytes) -> None:
        k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
        self._lib._check(self._lib.lib.bpf_map_update_elem(self._fd(), k, v, BPF_ANY),
                         f"update {self.path}")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there."""
        k = ctypes.create_string_buffer(key)
        rc = self._lib.lib.bpf_map_delete_elem(self._fd(), k)
        if rc < 0 and (ctypes.get_errno() or -rc) == 2:  # ENOENT
            return False
        self._lib._check(rc, f"delete {self.path}")
        return True

    def lookup(self, key: bytes) -> bytes | None:
        k = ctypes.create_string_buffer(key)
        v = ctypes.create_string_buffer(self.value_size)
        rc = self._lib.lib.bpf_map_lookup_elem(self._fd(), k, v)
        if rc < 0 and (ctypes.get_errno() or -rc) == 2:
            return None
        self._lib._check(rc, f"lookup {self.path}")
        return v.raw

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value), walking the keys (an element deleted meanwhile is skipped)."""
        key = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        prev: ctypes.Array[ctypes.c_char] | None = None
        while True:
            rc = self._lib.lib.bpf_map_get_next_key(self._fd(), prev, nxt)
            if rc < 0:
                if (ctypes.get_errno() or -rc) == 2:
                    return
                self._lib._check(rc, f"get_next_key {self.path}")
            ctypes.memmove(key, nxt, self.key_size)
            prev = key
            value = self.lookup(key.raw)
            if value is not None:
                yield key.raw, value

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
