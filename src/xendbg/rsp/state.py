"""The acknowledgement state machine, as one table.

Theory of operation
===================

Bytes travel through three layers, each with one job:

1. :class:`~xendbg.rsp.framing.FrameReader` scans the stream into tokens: ``+``,
   ``-``, 0x03 (outside a packet) and ``$wire#cs`` frames.  Junk between packets is
   dropped.  It cannot fail except on a packet beyond the size limit.
2. :class:`~xendbg.rsp.connection.Connection` applies the current ack state
   (``BEHAVIOUR`` below) to each token: it queues ``+``/``-`` for frames, answers a
   client's ``-`` by re-sending our last packet, decodes escapes and RLE, and emits
   events.  It feeds this module's ``TRANSITIONS`` with what it receives and sends.
3. :func:`~xendbg.rsp.packets.parse_request` turns a decoded payload into a typed
   request.

Errors split along the same line.  *Framing* damage (a packet beyond the size limit,
a dangling escape or repeat, end of stream inside a packet) means the byte stream can
no longer be trusted: it raises :class:`~xendbg.errors.RemoteProtocolError` and the
server drops the connection.  A wrong checksum is *not* such damage in ack mode: the
protocol's own remedy is ``-`` and a retransmission, so it becomes a ``BadChecksum``
event.  A *payload* problem inside a sound frame (a non-hex address, a missing comma)
is a request-level error: ``parse_request`` returns ``Malformed`` and the server
answers ``E..``; an unimplemented packet is ``Unknown`` and gets the empty reply.
Our own mistakes (an error code above 0xff, a stop reason without its address) raise
:class:`~xendbg.errors.LocalProtocolError` before any byte is produced.

No-ack mode (GDB manual, "Packet Acknowledgment")
-------------------------------------------------

The client asks with ``QStartNoAckMode``.  That packet is still acked, and so is our
``OK``: the switch happens *after* the ``OK`` is sent.  Hence the middle state
``NO_ACK_PENDING``, where we still ack like ``ACK``; sending ``OK`` completes the
switch, sending anything else (refusal) falls back to ``ACK``.  The client's ``+``
for our ``OK`` may arrive in ``NO_ACK``: every ``+``/``-`` is ignored there.  In
``NO_ACK`` a checksum mismatch is accepted, as gdbserver does: nobody would
retransmit, and over TCP only a careless client (some send ``#00``) gets it wrong.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BEHAVIOUR", "TRANSITIONS", "AckState", "Behaviour", "Input", "next_state"]


class AckState(enum.Enum):
    ACK = "ack"
    NO_ACK_PENDING = "no-ack pending"  # QStartNoAckMode received, reply not sent yet
    NO_ACK = "no-ack"


class Input(enum.Enum):
    RECEIVED_START_NO_ACK = "received QStartNoAckMode"
    SENT_OK = "sent OK"
    SENT_OTHER = "sent another packet"


@dataclass(frozen=True, slots=True)
class Behaviour:
    acks: bool  # send +/- for received frames, honour the client's +/-
    verify_checksum: bool  # a mismatch is a BadChecksum event, not a packet


BEHAVIOUR: dict[AckState, Behaviour] = {
    AckState.ACK: Behaviour(acks=True, verify_checksum=True),
    AckState.NO_ACK_PENDING: Behaviour(acks=True, verify_checksum=True),
    AckState.NO_ACK: Behaviour(acks=False, verify_checksum=False),
}

# (state, input) -> next state.  Pairs not listed leave the state unchanged.
TRANSITIONS: dict[tuple[AckState, Input], AckState] = {
    (AckState.ACK, Input.RECEIVED_START_NO_ACK): AckState.NO_ACK_PENDING,
    (AckState.NO_ACK_PENDING, Input.SENT_OK): AckState.NO_ACK,
    (AckState.NO_ACK_PENDING, Input.SENT_OTHER): AckState.ACK,
}


def next_state(state: AckState, event: Input) -> AckState:
    return TRANSITIONS.get((state, event), state)
