"""A stand-in for ``netfilterqueue.Packet``, for tests of the per-packet path."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakePacket:
    """A queued packet: records the calls made on it, takes one verdict only (a second
    raises, as NetfilterQueue's does); ``fail`` names a method that raises once."""

    payload: bytes
    fail: str | None = None
    id: int = 1
    """The packet id the kernel gave it (what a verdict names)."""
    calls: list[str] = field(default_factory=list)
    given: bytes | None = None
    """What set_payload was given."""

    def get_payload(self) -> bytes:
        self._call("get_payload")
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        self._call("set_payload")
        self.given = payload

    def accept(self) -> None:
        self._verdict("accept")

    def drop(self) -> None:
        self._verdict("drop")

    def _verdict(self, name: str) -> None:
        if any(c in ("accept", "drop") for c in self.calls):
            raise RuntimeError("Verdict already given for this packet")
        self._call(name)

    def _call(self, name: str) -> None:
        if name == self.fail:
            self.fail = None  # once: the verdict after it goes through
            raise RuntimeError(f"{name} failed")
        self.calls.append(name)
