"""A stand-in for ``netfilterqueue.Packet``, for tests of the per-packet path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from natedit import Direction
from natedit.nfqueue import PacketPath, Verdicts


class QueuedLike(Protocol):
    """A packet whose verdict :class:`OwnVerdicts` gives on it."""

    @property
    def id(self) -> int: ...
    def get_payload(self) -> bytes: ...
    def set_payload(self, payload: bytes) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


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


class OwnVerdicts(Verdicts):
    """A batch of verdicts stood in for that gives each verdict on the packet itself,
    at once (``set_payload`` for new bytes, then ``accept``; or ``drop``), as
    NetfilterQueue's own methods would: tests of the per-packet path see the verdict
    on the packet. ``packets``: the packets it gives verdicts to, by id."""

    def __init__(self, *packets: QueuedLike) -> None:
        super().__init__(0)
        self.packets = {p.id: p for p in packets}
        self.room = 1 << 30

    def accept(self, packet_id: int, payload: bytes | None = None) -> None:
        packet = self.packets[packet_id]
        if payload is not None:
            packet.set_payload(payload)
        packet.accept()

    def drop(self, packet_id: int) -> None:
        self.packets[packet_id].drop()


def give(path: PacketPath, packet: QueuedLike, direction: Direction,
         data: bytes | None = None, now: float | None = None) -> None:
    """``path.packet`` with the verdict given on ``packet`` itself (:class:`OwnVerdicts`)."""
    path.packet(packet, direction, OwnVerdicts(packet), data, now)
