"""Framing, acks, no-ack mode, escapes and run-length encoding (xendbg.rsp)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xendbg.errors import LocalProtocolError, RemoteProtocolError
from xendbg.rsp import (
    AckState,
    BadChecksum,
    Connection,
    ConnectionClosed,
    Interrupt,
    NeedData,
    Packet,
    QueryHaltReason,
    ReadRegisters,
    StartNoAckMode,
    WriteMemoryBinary,
)
from xendbg.rsp.events import Event
from xendbg.rsp.framing import (
    MAX_INCOMING_PAYLOAD,
    checksum,
    decode_payload,
    encode_frame,
    encode_payload,
)

FAST = settings(deadline=None, max_examples=300)


def drain(conn: Connection) -> list[Event]:
    """All events up to NeedData/ConnectionClosed (included)."""
    events: list[Event] = []
    while True:
        ev = conn.next_event()
        events.append(ev)
        if isinstance(ev, NeedData | ConnectionClosed):
            return events


def state(conn: Connection) -> AckState:
    # A call, so that type checkers do not keep narrowing conn.state between sends.
    return conn.state


def frame(payload: bytes) -> bytes:
    """An independent framer for tests: no escaping, checksum by hand."""
    return b"$" + payload + b"#" + f"{sum(payload) % 256:02x}".encode()


# --- checksums and frames ------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    # Frames as they appear in the GDB manual and in gdb's "set debug remote 1" logs.
    [(b"$OK#9a", b"OK"), (b"$g#67", b"g"), (b"$?#3f", b"?"), (b"$#00", b"")],
)
def test_known_frames(wire: bytes, expected: bytes) -> None:
    assert encode_frame(expected) == wire
    assert checksum(expected) == int(wire[-2:], 16)


def test_checksum_is_modulo_256() -> None:
    assert checksum(b"\xff\x02") == 0x01
    assert checksum(b"") == 0


def test_valid_packet_is_acked_and_parsed() -> None:
    conn = Connection()
    conn.receive_data(frame(b"?"))
    assert conn.next_event() == Packet(QueryHaltReason(), b"?")
    assert conn.data_to_send() == b"+"
    assert conn.next_event() == NeedData()
    assert conn.data_to_send() == b""


def test_uppercase_checksum_digits_accepted() -> None:
    conn = Connection()
    conn.receive_data(b"$OK#9A")
    assert isinstance(conn.next_event(), Packet)


@pytest.mark.parametrize("trailer", [b"#00", b"#zz", b"#9", b"# 9"])
def test_bad_checksum_asks_for_retransmission(trailer: bytes) -> None:
    conn = Connection()
    conn.receive_data(b"$g" + trailer + b"\n" + frame(b"g"))
    assert conn.next_event() == BadChecksum(b"g")
    assert conn.data_to_send() == b"-"
    assert conn.next_event() == Packet(ReadRegisters(), b"g")
    assert conn.data_to_send() == b"+"


# --- acks from the client ------------------------------------------------------------


def test_nak_retransmits_last_packet_until_acked() -> None:
    conn = Connection()
    sent = conn.send_packet(b"T05thread:1;")
    assert sent == frame(b"T05thread:1;")
    assert conn.awaiting_ack
    conn.receive_data(b"-")
    assert conn.next_event() == NeedData()
    assert conn.data_to_send() == sent
    conn.receive_data(b"-")
    assert conn.next_event() == NeedData()
    assert conn.data_to_send() == sent
    conn.receive_data(b"+")
    assert conn.next_event() == NeedData()
    assert not conn.awaiting_ack
    conn.receive_data(b"-")  # a nak after the ack has nothing to retransmit
    assert conn.next_event() == NeedData()
    assert conn.data_to_send() == b""


def test_retransmits_only_the_latest_packet() -> None:
    conn = Connection()
    conn.send_packet(b"OK")
    second = conn.send_packet(b"E01")
    conn.receive_data(b"-")
    drain(conn)
    assert conn.data_to_send() == second


def test_send_packet_flushes_pending_acks_first() -> None:
    conn = Connection()
    conn.receive_data(frame(b"g"))
    assert isinstance(conn.next_event(), Packet)
    assert conn.send_packet(b"00") == b"+" + frame(b"00")


def test_send_packet_rejects_non_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        Connection().send_packet("OK")  # type: ignore[arg-type]


# --- no-ack mode ---------------------------------------------------------------------


def test_no_ack_switch_happens_after_our_ok() -> None:
    conn = Connection()
    conn.receive_data(frame(b"QStartNoAckMode"))
    assert conn.next_event() == Packet(StartNoAckMode(), b"QStartNoAckMode")
    assert state(conn) is AckState.NO_ACK_PENDING
    assert conn.ack_mode
    # The request itself is acked, then OK goes out in ack mode...
    assert conn.send_packet(b"OK") == b"+$OK#9a"
    assert state(conn) is AckState.NO_ACK
    assert not conn.ack_mode
    # ...and the client's '+' for that OK is a stray ack to tolerate.
    conn.receive_data(b"+" + frame(b"qC"))
    assert isinstance(conn.next_event(), Packet)
    assert conn.data_to_send() == b""
    # Naks are ignored too: nothing is retransmitted in no-ack mode.
    conn.send_packet(b"QC1")
    conn.receive_data(b"-")
    assert conn.next_event() == NeedData()
    assert conn.data_to_send() == b""


def test_no_ack_accepts_checksum_mismatch_like_gdbserver() -> None:
    conn = Connection(ack_mode=False)
    conn.receive_data(b"$g#00")
    assert conn.next_event() == Packet(ReadRegisters(), b"g")
    assert conn.data_to_send() == b""


def test_refusing_no_ack_mode_stays_in_ack_mode() -> None:
    conn = Connection()
    conn.receive_data(frame(b"QStartNoAckMode"))
    conn.next_event()
    assert conn.send_packet(b"") == b"+" + frame(b"")
    assert state(conn) is AckState.ACK
    conn.receive_data(frame(b"g"))
    conn.next_event()
    assert conn.data_to_send() == b"+"


# --- bytes outside packets -----------------------------------------------------------


def test_interrupt_byte_outside_packet() -> None:
    conn = Connection()
    conn.receive_data(b"\x03" + frame(b"?"))
    assert conn.next_event() == Interrupt()
    assert isinstance(conn.next_event(), Packet)


def test_interrupt_byte_inside_packet_is_data() -> None:
    conn = Connection(ack_mode=False)
    conn.receive_data(encode_frame(b"X1000,3:\x03\x03#"))
    assert conn.next_event() == Packet(
        WriteMemoryBinary(0x1000, b"\x03\x03#"), b"X1000,3:\x03\x03#"
    )
    assert conn.next_event() == NeedData()


def test_junk_and_client_notifications_are_ignored() -> None:
    conn = Connection()
    conn.receive_data(b"hello\r\n%Stop:T05#b9" + frame(b"?") + b"trailing junk")
    assert conn.next_event() == Packet(QueryHaltReason(), b"?")
    assert conn.next_event() == NeedData()


def test_dollar_inside_packet_restarts_the_packet() -> None:
    conn = Connection()
    conn.receive_data(b"$m10" + frame(b"g"))
    assert conn.next_event() == Packet(ReadRegisters(), b"g")
    assert conn.next_event() == NeedData()


def test_byte_by_byte_delivery() -> None:
    stream = b"+" + frame(b"qC") + b"\x03" + encode_frame(b"X0,1:}") + b"-"
    whole = Connection()
    whole.receive_data(stream)
    single = Connection()
    events: list[Event] = []
    for i in range(len(stream)):
        single.receive_data(stream[i : i + 1])
        events += [e for e in drain(single) if not isinstance(e, NeedData)]
    assert events == [e for e in drain(whole) if not isinstance(e, NeedData)]
    assert len(events) == 3
    assert single.data_to_send() == whole.data_to_send() == b"++"


# --- limits and end of stream --------------------------------------------------------


def test_over_long_packet_is_a_protocol_error() -> None:
    conn = Connection()
    conn.receive_data(b"$" + b"0" * MAX_INCOMING_PAYLOAD)
    assert conn.next_event() == NeedData()  # exactly at the limit: still fine
    conn.receive_data(b"0")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_over_long_complete_packet_is_a_protocol_error() -> None:
    conn = Connection(max_payload=16)
    conn.receive_data(frame(b"m" * 17))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_rle_bomb_is_a_protocol_error() -> None:
    conn = Connection(ack_mode=False, max_payload=64)
    conn.receive_data(frame(b"0" + b"*~" * 20))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_end_of_stream() -> None:
    conn = Connection()
    conn.receive_data(frame(b"k") + b"junk")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Packet)
    assert conn.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"+")


def test_end_of_stream_inside_packet() -> None:
    conn = Connection()
    conn.receive_data(b"$m1000,")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# --- escapes -------------------------------------------------------------------------


def test_escape_encoding_per_manual() -> None:
    assert encode_payload(b"a#b$c}d*e") == b"a}\x03b}\x04c}]d}\x0ae"
    assert decode_payload(b"a}\x03b}\x04c}]d}\x0ae") == b"a#b$c}d*e"


@FAST
@given(st.binary(max_size=300), st.booleans())
def test_escape_and_rle_round_trip(data: bytes, rle: bool) -> None:
    wire = encode_payload(data, rle)
    assert decode_payload(wire) == data
    # No bare framing characters may survive encoding.
    assert b"#" not in wire
    assert b"$" not in wire
    if not rle:
        assert len(wire) == len(data) + sum(data.count(c) for c in b"#$}*")


@FAST
@given(st.binary(max_size=300), st.booleans())
def test_connection_round_trip(data: bytes, rle: bool) -> None:
    conn = Connection()
    conn.receive_data(encode_frame(data, rle))
    event = conn.next_event()
    assert isinstance(event, Packet)
    assert event.payload == data


@pytest.mark.parametrize("bad", [b"}", b"ab}", b"*", b"*!", b"0*", b"0*\x1f", b"0*\x7f"])
def test_broken_escape_or_repeat_is_a_protocol_error(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_payload(bad)


# --- run-length encoding -------------------------------------------------------------

# The table from the GDB manual's discussion of run-length encoding: the first
# character is sent as is, ``*`` + chr(n + 29) adds n more, and the counts 6 and 7
# (``#``, ``$``) are unusable, so 7 and 8 characters need a literal tail.
MANUAL_RLE = [
    (b"0* ", b"0000"),
    (b"0*!", b"00000"),
    (b'0*"', b"000000"),
    (b'0*"0', b"0000000"),
    (b'0*"00', b"00000000"),
    (b"0*%", b"000000000"),
]


@pytest.mark.parametrize(("wire", "plain"), MANUAL_RLE)
def test_rle_decode_manual_examples(wire: bytes, plain: bytes) -> None:
    assert decode_payload(wire) == plain


@pytest.mark.parametrize(("wire", "plain"), MANUAL_RLE)
def test_rle_encode_manual_examples(wire: bytes, plain: bytes) -> None:
    assert encode_payload(plain, rle=True) == wire


def test_rle_short_runs_stay_literal() -> None:
    assert encode_payload(b"000", rle=True) == b"000"


def test_rle_never_repeats_escaped_bytes() -> None:
    # gdb expands on the raw text, lldb on the decoded byte: only plain runs agree.
    assert encode_payload(b"}" * 5, rle=True) == b"}]" * 5


def test_rle_decode_repeats_the_decoded_byte() -> None:
    assert decode_payload(b"}]* ") == b"}" * 4


@FAST
@given(st.lists(st.tuples(st.sampled_from(b"0afx\x00 #*"), st.integers(1, 300)), max_size=6))
def test_rle_encode_properties(runs: list[tuple[int, int]]) -> None:
    data = b"".join(bytes((b,)) * n for b, n in runs)
    wire = encode_payload(data, rle=True)
    assert decode_payload(wire) == data
    for m in re.finditer(rb"(?<!})\*(.)", wire, re.DOTALL):
        count = m[1][0] - 29
        assert 3 <= count <= 97
        assert m[1] not in (b"#", b"$", b"*", b"}")
    assert len(wire) <= len(data) + sum(data.count(c) for c in b"#$}*")


@given(st.binary(max_size=5000))
def test_checksum_is_the_byte_sum_mod_256(data: bytes) -> None:
    assert checksum(data) == sum(data) % 256
