"""The fuzz rule: any byte stream, whole or byte by byte, yields events or a
RemoteProtocolError, and garbage payloads parse to Unknown/Malformed, never a crash."""

from __future__ import annotations

import binascii

from hypothesis import given, settings
from hypothesis import strategies as st

from xendbg.errors import RemoteProtocolError
from xendbg.rsp import Connection, ConnectionClosed, Malformed, NeedData, Packet, Unknown
from xendbg.rsp.events import Event
from xendbg.rsp.framing import encode_frame
from xendbg.rsp.packets import parse_request
from xendbg.rsp.requests import Request

FAST = settings(deadline=None, max_examples=300)

# Real client packets (shared/notes/rsp-clients.md) plus every packet shape we parse.
VALID_PAYLOADS = [
    b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386",
    b"qSupported:xmlRegisters=i386,arm,mips,arc;multiprocess+",
    b"vMustReplyEmpty",
    b"QStartNoAckMode",
    b"Hg0",
    b"Hc-1",
    b"Hgp1.1",
    b"qXfer:features:read:target.xml:0,1000",
    b"qTStatus",
    b"?",
    b"qfThreadInfo",
    b"qsThreadInfo",
    b"qAttached",
    b"g",
    b"g;thread:0001;",
    b"G0011;thread:1;",
    b"p10;thread:1;",
    b"P10=0011223344556677;thread:1;",
    b"m401000,1",
    b"M1000,2:aabb",
    b"X1000,3:\x00#}",
    b"x0,0",
    b"Z0,401000,1;X3,220f01",
    b"z0,401000,1",
    b"vCont?",
    b"vCont;c",
    b"vCont;s:1",
    b"vCont;C05:p1.2;r1000,2000:1;t",
    b"C05;1000",
    b"S0b",
    b"c",
    b"s1000",
    b"T1",
    b"qC",
    b"qThreadExtraInfo,1",
    b"qHostInfo",
    b"qProcessInfo",
    b"qMemoryRegionInfo:401000",
    b"qWatchpointSupportInfo:",
    b"qRegisterInfo1a",
    b"qRcmd," + binascii.hexlify(b"help"),
    b"qSymbol::",
    b"qOffsets",
    b"jThreadsInfo",
    b"D;1",
    b"vKill;1",
    b"k",
]
PREFIXES = sorted({p[:n] for p in VALID_PAYLOADS for n in (1, 2, 6, 10, 18)})

payloads = st.sampled_from(VALID_PAYLOADS)
garbage = st.binary(max_size=64)
FRAMING_ALPHABET = b"$#}*+-\x03%0aZ:,;]\n\x04" + bytes(range(0x20, 0x30))


def feed_whole(data: bytes, **kw: object) -> tuple[list[Event], bool]:
    """Events from one receive_data call (then EOF); True if a RemoteProtocolError ended it."""
    conn = Connection(**kw)  # type: ignore[arg-type]
    if data:
        conn.receive_data(data)
    conn.receive_data(b"")
    return _drain(conn)


def feed_bytewise(data: bytes, **kw: object) -> tuple[list[Event], bool]:
    conn = Connection(**kw)  # type: ignore[arg-type]
    events: list[Event] = []
    try:
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
            while not isinstance(ev := conn.next_event(), NeedData):
                events.append(ev)
    except RemoteProtocolError:
        return events, True
    conn.receive_data(b"")
    tail, failed = _drain(conn)
    return events + tail, failed


def _drain(conn: Connection) -> tuple[list[Event], bool]:
    events: list[Event] = []
    try:
        while True:
            ev = conn.next_event()
            assert not isinstance(ev, NeedData), "NeedData after end of stream"
            if isinstance(ev, ConnectionClosed):
                return events, False
            events.append(ev)
    except RemoteProtocolError:
        return events, True


def check_stream(data: bytes, **kw: object) -> None:
    """The fuzz rule, plus: chunking never changes what comes out."""
    whole, whole_failed = feed_whole(data, **kw)
    single, single_failed = feed_bytewise(data, **kw)
    assert whole_failed == single_failed
    assert whole == single
    for ev in whole:
        if isinstance(ev, Packet):
            assert isinstance(ev.request, Request)


def mutate(data: bytes, edits: bytes) -> bytes:
    """Apply 4-byte edits (op, position hi, position lo, value).

    op % 4: 0 flips bits, 1 inserts, 2 deletes, 3 truncates.  Edits are drawn as one
    binary blob because hypothesis draws that far faster than lists of tuples.
    """
    buf = bytearray(data)
    for k in range(0, len(edits) - 3, 4):
        op, pos, value = edits[k] % 4, edits[k + 1] << 8 | edits[k + 2], edits[k + 3]
        if not buf:
            buf.append(value)
            continue
        i = pos % len(buf)
        if op == 0:
            buf[i] ^= value or 1
        elif op == 1:
            buf.insert(i, value)
        elif op == 2:
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


edits = st.binary(max_size=24)


STREAM_PARTS = [encode_frame(p) for p in VALID_PAYLOADS] + [
    b"+",
    b"-",
    b"\x03",
    b"junk",
    b"%Stop:T05#00",
]


def valid_stream(picks: bytes, binary: bytes) -> bytes:
    """Frames and controls chosen by ``picks``, plus one RLE-encoded binary frame."""
    parts = [STREAM_PARTS[b % len(STREAM_PARTS)] for b in picks]
    parts.insert(len(binary) % (len(parts) + 1), encode_frame(binary, rle=True))
    return b"".join(parts)


@FAST
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes(data: bytes, ack_mode: bool) -> None:
    check_stream(data, ack_mode=ack_mode)


@FAST
@given(
    st.lists(st.one_of(garbage, st.sampled_from([b"$", b"#", b"}", b"*", b"\x03"])), max_size=30)
)
def test_random_framing_characters(chunks: list[bytes]) -> None:
    # Plain random bytes rarely form frames; bias towards the special characters.
    check_stream(b"".join(chunks), max_payload=32)


@FAST
@given(st.binary(max_size=8), st.binary(max_size=40), edits, st.booleans())
def test_mutated_valid_streams(picks: bytes, binary: bytes, changes: bytes, ack: bool) -> None:
    check_stream(mutate(valid_stream(picks, binary), changes), ack_mode=ack, max_payload=64)


@FAST
@given(st.binary(min_size=1, max_size=8))
def test_valid_streams_parse_to_known_requests(picks: bytes) -> None:
    chosen = [VALID_PAYLOADS[b % len(VALID_PAYLOADS)] for b in picks]
    events, failed = feed_whole(b"".join(encode_frame(p) for p in chosen))
    assert not failed
    assert [e.payload for e in events if isinstance(e, Packet)] == chosen
    for ev in events:
        assert isinstance(ev, Packet)
        assert not isinstance(ev.request, Unknown | Malformed), ev


@FAST
@given(garbage)
def test_parse_garbage(payload: bytes) -> None:
    assert isinstance(parse_request(payload), Request)


@FAST
@given(st.sampled_from(PREFIXES), garbage)
def test_parse_known_prefix_with_garbage(prefix: bytes, tail: bytes) -> None:
    req = parse_request(prefix + tail)
    assert isinstance(req, Request)
    if isinstance(req, Malformed):
        assert req.payload == prefix + tail


@FAST
@given(payloads, edits)
def test_parse_mutated_payloads(payload: bytes, changes: bytes) -> None:
    assert isinstance(parse_request(mutate(payload, changes)), Request)
