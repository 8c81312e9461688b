"""The stub side of one GDB remote connection, sans I/O.

Typical use by a server loop::

    conn.receive_data(sock_bytes)            # b"" at end of stream
    while not isinstance(ev := conn.next_event(), NeedData | ConnectionClosed):
        write(conn.data_to_send())           # acks, naks, retransmissions
        if isinstance(ev, Packet):
            write(conn.send_packet(handle(ev.request)))
    write(conn.data_to_send())

See :mod:`xendbg.rsp.state` for the theory of operation.
"""

from __future__ import annotations

from xendbg.errors import LocalProtocolError, RemoteProtocolError
from xendbg.rsp.events import BadChecksum, ConnectionClosed, Event, Interrupt, NeedData, Packet
from xendbg.rsp.framing import (
    MAX_INCOMING_PAYLOAD,
    Control,
    Frame,
    FrameReader,
    decode_payload,
    encode_frame,
)
from xendbg.rsp.packets import parse_request
from xendbg.rsp.requests import StartNoAckMode
from xendbg.rsp.state import BEHAVIOUR, AckState, Input, next_state

__all__ = ["ADVERTISED_PACKET_SIZE", "Connection"]

# What we announce as PacketSize in qSupported: the largest packet gdb will send us
# (it also sizes its m/M requests from it).
ADVERTISED_PACKET_SIZE = 0x4000


class Connection:
    """Bytes in, events out; reply payloads in, framed bytes out.

    ``ack_mode=False`` starts in no-ack mode (for tests or pre-negotiated links).
    ``rle`` run-length encodes every sent packet unless ``send_packet`` says otherwise.
    """

    def __init__(
        self,
        *,
        ack_mode: bool = True,
        rle: bool = False,
        max_payload: int = MAX_INCOMING_PAYLOAD,
    ) -> None:
        self._reader = FrameReader(max_payload)
        self._state = AckState.ACK if ack_mode else AckState.NO_ACK
        self._behaviour = BEHAVIOUR[self._state]
        self._rle = rle
        self._outgoing = bytearray()
        self._unacked: bytes | None = None  # our last frame, until the client's '+'
        self._eof = False

    # --- state -----------------------------------------------------------------------

    @property
    def state(self) -> AckState:
        return self._state

    @property
    def ack_mode(self) -> bool:
        """True while ``+``/``-`` acknowledgements are exchanged."""
        return self._behaviour.acks

    def _feed_state(self, event: Input) -> None:
        self._state = next_state(self._state, event)
        self._behaviour = BEHAVIOUR[self._state]

    @property
    def awaiting_ack(self) -> bool:
        """True when our last packet has not been acknowledged yet (ack mode only)."""
        return self._unacked is not None

    # --- receiving -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Append bytes from the client; ``b""`` signals the end of the stream."""
        if self._eof:
            raise LocalProtocolError("receive_data called after the end of the stream")
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event:
        """The next event; raises RemoteProtocolError if the framing is broken."""
        while True:
            token = self._reader.next_token()
            if token is None:
                if not self._eof:
                    return NeedData()
                if self._reader.in_packet:
                    raise RemoteProtocolError("stream ended inside a packet")
                return ConnectionClosed()
            if isinstance(token, Frame):
                return self._frame(token)
            if token is Control.INTERRUPT:
                return Interrupt()
            self._control(token)

    def _frame(self, frame: Frame) -> Event:
        behaviour = self._behaviour
        if behaviour.verify_checksum and not frame.checksum_ok:
            self._outgoing += b"-"
            return BadChecksum(frame.wire)
        payload = decode_payload(frame.wire, self._reader.max_payload)
        if behaviour.acks:
            self._outgoing += b"+"
        request = parse_request(payload)
        if isinstance(request, StartNoAckMode):
            self._feed_state(Input.RECEIVED_START_NO_ACK)
        return Packet(request, payload)

    def _control(self, token: Control) -> None:
        if not self._behaviour.acks:
            return  # stray acks in no-ack mode, e.g. the client's '+' for our OK
        if token is Control.ACK:
            self._unacked = None
        elif self._unacked is not None:  # NAK: re-send what the client did not get
            self._outgoing += self._unacked

    # --- sending ---------------------------------------------------------------------

    def send_packet(self, payload: bytes, *, rle: bool | None = None) -> bytes:
        """Frame ``payload`` and return the bytes to write, pending acks first.

        The payload is escaped (and run-length encoded if ``rle``, default: the
        connection's setting).  Sending ``OK`` right after ``QStartNoAckMode``
        switches to no-ack mode.
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise LocalProtocolError(f"payload must be bytes, not {type(payload).__name__}")
        payload = bytes(payload)
        frame = encode_frame(payload, self._rle if rle is None else rle)
        acked = self._behaviour.acks
        self._feed_state(Input.SENT_OK if payload == b"OK" else Input.SENT_OTHER)
        # Once no-ack mode starts, nothing is retransmitted, not even this OK.
        self._unacked = frame if acked and self._behaviour.acks else None
        return self.data_to_send() + frame

    def data_to_send(self) -> bytes:
        """Drain the queued control bytes (``+``, ``-``) and retransmissions."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out
