"""libnftables through ctypes: nft commands in natedit's own process.

One nftables transaction per call of :meth:`Nft.run` (everything in the
buffer commits or nothing does), with no ``nft`` process per transaction. It
reads the ruleset into its cache on each run (about 290 us on a gateway with
iptables-nft tables), so the worker's per-turn updates of the ownership sets
go through :mod:`natedit.nftset` (netlink batches) instead; :mod:`natedit.owned`
takes an :class:`NftLike` for tests and tools that want nft's own syntax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Protocol

from . import NateditError

NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(NateditError):
    """libnftables is missing, or nftables refused a transaction."""


class NftLike(Protocol):
    """What the users of :class:`Nft` need (tests give a fake)."""

    def run(self, commands: str, *, json_output: bool = False,
            handles: bool = False) -> str: ...
    def close(self) -> None: ...


class Nft:
    """One libnftables context."""

    def __init__(self, library: str | None = None) -> None:
        name = library or ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise NftError(f"natedit needs libnftables ({exc}; Debian: apt-get install "
                           "libnftables1)") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self._lib = lib
        self._ctx: int | None = lib.nft_ctx_new(0)
        if not self._ctx:
            raise NftError("libnftables: cannot create a context")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str, *, json_output: bool = False, handles: bool = False) -> str:
        """Run ``commands`` (nft -f syntax) as one transaction; their output."""
        if self._ctx is None:
            raise NftError("libnftables: context closed")
        lib = self._lib
        flags = (NFT_CTX_OUTPUT_JSON if json_output else 0) | (
            NFT_CTX_OUTPUT_HANDLE if handles else 0)
        lib.nft_ctx_output_set_flags(self._ctx, flags)
        rc = lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            raise NftError(f"nft: {lines[0] if lines else f'status {rc}'}"
                           + (f" ({lines[1][:160]})" if len(lines) > 1 else ""))
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
