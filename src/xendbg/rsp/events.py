"""Events :meth:`Connection.next_event` returns, in the order the bytes arrived."""

from __future__ import annotations

from dataclasses import dataclass

from xendbg.rsp.requests import Request

__all__ = ["BadChecksum", "ConnectionClosed", "Event", "Interrupt", "NeedData", "Packet"]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every connection event."""


@dataclass(frozen=True, slots=True)
class Packet(Event):
    """A well-framed packet.  ``payload`` is decoded (no escapes, no RLE)."""

    request: Request
    payload: bytes


@dataclass(frozen=True, slots=True)
class Interrupt(Event):
    """The client sent 0x03 outside a packet (gdb's ^C): stop the target."""


@dataclass(frozen=True, slots=True)
class BadChecksum(Event):
    """A frame whose checksum did not match, in ack mode.

    The connection has already queued the ``-`` that asks for a retransmission
    (:meth:`Connection.data_to_send`); the server only has to write it.
    """

    wire: bytes


@dataclass(frozen=True, slots=True)
class NeedData(Event):
    """No complete event yet: call ``receive_data`` with more bytes."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client closed the stream (``receive_data(b"")``) between packets."""
