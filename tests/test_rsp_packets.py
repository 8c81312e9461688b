"""Payload parsing into typed requests, and reply formatting (xendbg.rsp)."""

from __future__ import annotations

import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xendbg.errors import LocalProtocolError
from xendbg.rsp import (
    Attached,
    BreakpointType,
    Connection,
    Continue,
    ContinueWithSignal,
    CurrentThread,
    Detach,
    EnableErrorStrings,
    HostInfo,
    InsertBreakpoint,
    Kill,
    ListThreadsInStopReply,
    Malformed,
    MemoryRegionInfo,
    MonitorCommand,
    MustReplyEmpty,
    Offsets,
    ProcessInfo,
    QueryHaltReason,
    ReadMemory,
    ReadMemoryBinary,
    ReadRegister,
    ReadRegisters,
    RegisterInfo,
    RemoveBreakpoint,
    Request,
    SetThread,
    StartNoAckMode,
    Step,
    StepWithSignal,
    StopReason,
    Supported,
    Symbol,
    ThreadAlive,
    ThreadExtraInfo,
    ThreadId,
    ThreadInfoFirst,
    ThreadInfoNext,
    ThreadsInfo,
    ThreadSuffixSupported,
    TraceStatus,
    Unknown,
    VCont,
    VContAction,
    VContQuery,
    VKill,
    WatchpointSupportInfo,
    WriteMemory,
    WriteMemoryBinary,
    WriteRegister,
    WriteRegisters,
    XferRead,
    parse_request,
    replies,
)
from xendbg.rsp.fields import PayloadError
from xendbg.rsp.framing import decode_payload

FAST = settings(deadline=None, max_examples=300)
T1 = ThreadId(1)

GDB_QSUPPORTED = (
    b"qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn+;fork-events+;vfork-events+;"
    b"exec-events+;vContSupported+;QThreadEvents+;no-resumed+;memory-tagging+;xmlRegisters=i386"
)

PARSED: list[tuple[bytes, Request]] = [
    # gdb 13 connect / break / step / exit sequence (shared/notes/rsp-clients.md)
    (b"vMustReplyEmpty", MustReplyEmpty()),
    (b"QStartNoAckMode", StartNoAckMode()),
    (b"Hg0", SetThread("g", ThreadId.ANY)),
    (b"qXfer:features:read:target.xml:0,1000", XferRead("features", "target.xml", 0, 0x1000)),
    (b"qTStatus", TraceStatus()),
    (b"?", QueryHaltReason()),
    (b"qfThreadInfo", ThreadInfoFirst()),
    (b"qsThreadInfo", ThreadInfoNext()),
    (b"qAttached", Attached()),
    (b"Hc-1", SetThread("c", ThreadId.ALL)),
    (b"g", ReadRegisters()),
    (b"m401000,1", ReadMemory(0x401000, 1)),
    (b"Z0,401000,1", InsertBreakpoint(BreakpointType.SOFTWARE, 0x401000, 1)),
    (b"vCont?", VContQuery()),
    (b"vCont;c", VCont((VContAction("c"),))),
    (b"z0,401000,1", RemoveBreakpoint(BreakpointType.SOFTWARE, 0x401000, 1)),
    (b"vCont;s:1", VCont((VContAction("s", T1),))),
    (b"D", Detach()),
    (b"vKill;1", VKill(1)),
    (b"k", Kill()),
    # lldb 14 connect sequence
    (b"QThreadSuffixSupported", ThreadSuffixSupported()),
    (b"QListThreadsInStopReply", ListThreadsInStopReply()),
    (b"qHostInfo", HostInfo()),
    (b"QEnableErrorStrings", EnableErrorStrings()),
    (b"qProcessInfo", ProcessInfo()),
    (b"qXfer:features:read:target.xml:0,1ffff", XferRead("features", "target.xml", 0, 0x1FFFF)),
    (b"Hg1", SetThread("g", T1)),
    (b"p0", ReadRegister(0)),
    (b"x0,0", ReadMemoryBinary(0, 0)),
    (b"p10", ReadRegister(0x10)),
    (b"m401000,200", ReadMemory(0x401000, 0x200)),
    (b"qMemoryRegionInfo:401000", MemoryRegionInfo(0x401000)),
    (b"jThreadsInfo", ThreadsInfo()),
    (b"vCont;s:0001", VCont((VContAction("s", T1),))),
    (b"c", Continue()),
    # lldb thread-suffix forms
    (b"g;thread:0001;", ReadRegisters(T1)),
    (b"p10;thread:0001;", ReadRegister(0x10, T1)),
    (b"p10;thread:2a", ReadRegister(0x10, ThreadId(0x2A))),
    (b"P10=efbeadde00000000;thread:1;", WriteRegister(0x10, bytes.fromhex("efbeadde00000000"), T1)),
    (b"G0011aAbB;thread:1;", WriteRegisters(b"\x00\x11\xaa\xbb", T1)),
    # the rest of the packet set
    (b"G00112233", WriteRegisters(b"\x00\x11\x22\x33")),
    (b"P7=ff", WriteRegister(7, b"\xff")),
    (b"M1000,3:aabbcc", WriteMemory(0x1000, b"\xaa\xbb\xcc")),
    (b"X1000,0:", WriteMemoryBinary(0x1000, b"")),
    (b"X1000,4:ab:\x00", WriteMemoryBinary(0x1000, b"ab:\x00")),
    (b"xffffffff81000000,800", ReadMemoryBinary(0xFFFFFFFF81000000, 0x800)),
    (b"c401000", Continue(0x401000)),
    (b"C0b", ContinueWithSignal(11)),
    (b"C05;401000", ContinueWithSignal(5, 0x401000)),
    (b"s", Step()),
    (b"s401000", Step(0x401000)),
    (b"S05", StepWithSignal(5)),
    (b"S05;10", StepWithSignal(5, 0x10)),
    (
        b"vCont;C05:p1.2;S0b:3;t:4;r1000,2000:p1.-1;c",
        VCont(
            (
                VContAction("C", ThreadId(2, 1), signal=5),
                VContAction("S", ThreadId(3), signal=0xB),
                VContAction("t", ThreadId(4)),
                VContAction("r", ThreadId(-1, 1), start=0x1000, end=0x2000),
                VContAction("c"),
            )
        ),
    ),
    (b"Z1,ffff800000001000,1", InsertBreakpoint(BreakpointType.HARDWARE, 0xFFFF800000001000, 1)),
    (b"Z2,1000,8", InsertBreakpoint(BreakpointType.WRITE_WATCHPOINT, 0x1000, 8)),
    (b"Z3,1000,4", InsertBreakpoint(BreakpointType.READ_WATCHPOINT, 0x1000, 4)),
    (b"z4,1000,2", RemoveBreakpoint(BreakpointType.ACCESS_WATCHPOINT, 0x1000, 2)),
    (
        b"Z0,1000,1;X3,220f01;cmds:0,X2,2201",
        InsertBreakpoint(BreakpointType.SOFTWARE, 0x1000, 1, (b"X3,220f01", b"cmds:0,X2,2201")),
    ),
    (b"Hgp1.1", SetThread("g", ThreadId(1, 1))),
    (b"Hcp-1.-1", SetThread("c", ThreadId(-1, -1))),
    (b"Hgp2", SetThread("g", ThreadId(-1, 2))),
    (b"T1a", ThreadAlive(ThreadId(0x1A))),
    (b"Tp1.1", ThreadAlive(ThreadId(1, 1))),
    (b"qC", CurrentThread()),
    (b"qAttached:1", Attached(1)),
    (b"qXfer:threads:read::0,fff", XferRead("threads", "", 0, 0xFFF)),
    (b"qThreadExtraInfo,1", ThreadExtraInfo(T1)),
    (b"qThreadExtraInfo,p1.2", ThreadExtraInfo(ThreadId(2, 1))),
    (b"qWatchpointSupportInfo", WatchpointSupportInfo()),
    (b"qWatchpointSupportInfo:", WatchpointSupportInfo()),
    (b"qRcmd," + binascii.hexlify(b"info vcpus"), MonitorCommand("info vcpus")),
    (b"qRcmd," + binascii.hexlify("état".encode()), MonitorCommand("état")),
    (b"D;1", Detach(1)),
    (b"vKill", VKill()),
    (b"qRegisterInfo0", RegisterInfo(0)),
    (b"qRegisterInfo1a", RegisterInfo(0x1A)),
    (b"qOffsets", Offsets()),
    (b"qSymbol::", Symbol()),
    (b"qSymbol:401000:" + binascii.hexlify(b"main"), Symbol(0x401000, "main")),
    (b"qSymbol::" + binascii.hexlify(b"nosuch"), Symbol(None, "nosuch")),
]


@pytest.mark.parametrize(
    ("payload", "expected"), PARSED, ids=[p[:40].decode("latin-1") for p, _ in PARSED]
)
def test_parse(payload: bytes, expected: Request) -> None:
    assert parse_request(payload) == expected


def test_parse_gdb_qsupported() -> None:
    req = parse_request(GDB_QSUPPORTED)
    assert isinstance(req, Supported)
    assert req.features["multiprocess"] == "+"
    assert req.features["swbreak"] == "+"
    assert req.features["xmlRegisters"] == "i386"
    assert len(req.features) == 12


def test_parse_lldb_qsupported_and_feature_forms() -> None:
    req = parse_request(b"qSupported:xmlRegisters=i386,arm,mips,arc;multiprocess+;foo-;bar?;baz;;")
    assert isinstance(req, Supported)
    assert dict(req.features) == {
        "xmlRegisters": "i386,arm,mips,arc",
        "multiprocess": "+",
        "foo": "-",
        "bar": "?",
        "baz": "",
    }
    bare = parse_request(b"qSupported")
    assert isinstance(bare, Supported)
    assert dict(bare.features) == {}


@pytest.mark.parametrize(
    "payload",
    [
        b"qVAttachOrWaitSupported",
        b"qStructuredDataPlugins",
        b"qShlibInfoAddr",
        b"jThreadExtendedInfo:",
        b"vFile:open:2f,0,0",
        b"qXfer:features:write:target.xml:0:abc",
        b"qSupportedFoo",
        b"qAttachedX",
        b"qCRC:1000,10",
        b"!",
        b"",
        b"kk",
    ],
)
def test_unknown_packets(payload: bytes) -> None:
    assert parse_request(payload) == Unknown(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"m1000",  # missing comma
        b"mzz,1",  # non-hex address
        b"m0x10,1",  # no 0x prefix in the protocol
        b"m 10,1",
        b"m-1,1",
        b"m10000000000000000,1",  # beyond 64 bits
        b"M1000,2:aabbcc",  # length disagrees with the data
        b"M1000,1:a",
        b"M1000,1",
        b"X1000,2:a",
        b"g1",
        b"g;thread:zz;",
        b"g;foo",
        b"p",
        b"P10",
        b"P10=zz",
        b"Gabc",
        b"C",
        b"C100",
        b"Cxx;1",
        b"S05;",
        b"cxyz",
        b"Z5,1000,1",
        b"Z0,1000",
        b"z0,1000,1;X1,00",
        b"Hx1",
        b"H",
        b"Hg",
        b"Hg-2",
        b"Tp",
        b"Tp1.",
        b"vCont;",
        b"vCont;q",
        b"vCont;c1",
        b"vCont;C",
        b"vCont;r1000",
        b"vCont;s:",
        b"qXfer:features:read:target.xml",
        b"qXfer:features:read:target.xml:0",
        b"qMemoryRegionInfo:",
        b"qRegisterInfoxyz",
        b"qRcmd,6",
        b"qRcmd,ff",  # not UTF-8
        b"qAttached:",
        b"D1",
        b"D;",
        b"vKill;zz",
        b"qSymbol:",
        b"qSymbol:zz:00",
        b"qSupported:\xff+",
        b"qThreadExtraInfo,",
    ],
)
def test_malformed_packets(payload: bytes) -> None:
    req = parse_request(payload)
    assert isinstance(req, Malformed)
    assert req.payload == payload
    assert req.reason


def test_requests_are_frozen() -> None:
    req = parse_request(b"m10,1")
    with pytest.raises(AttributeError):
        req.addr = 0  # type: ignore[attr-defined]


# --- thread ids ----------------------------------------------------------------------

ids = st.one_of(st.just(-1), st.integers(0, 2**64 - 1))


@FAST
@given(tid=ids, pid=st.one_of(st.none(), ids))
def test_thread_id_round_trip(tid: int, pid: int | None) -> None:
    t = ThreadId(tid, pid)
    assert ThreadId.parse(t.encode(multiprocess=True)) == t
    assert ThreadId.parse(t.encode(multiprocess=False)) == ThreadId(tid)


def test_thread_id_forms() -> None:
    assert ThreadId.parse(b"-1").is_all
    assert ThreadId.parse(b"0").is_any
    assert ThreadId.parse(b"p1").is_all
    assert ThreadId(0x1A, 3).encode(multiprocess=True) == b"p3.1a"
    assert ThreadId(0x1A, 3).encode() == b"1a"
    assert ThreadId.ALL.encode() == b"-1"
    with pytest.raises(PayloadError):
        ThreadId.parse(b"-2")
    with pytest.raises(LocalProtocolError):
        ThreadId(-5)


# --- replies -------------------------------------------------------------------------


def test_ok_empty_and_errors() -> None:
    assert replies.OK == b"OK"
    assert replies.EMPTY == b""
    assert replies.error(0x0E) == b"E0e"
    assert replies.error(1, "no such vCPU") == b"E01;" + binascii.hexlify(b"no such vCPU")
    with pytest.raises(LocalProtocolError):
        replies.error(0x100)


def test_memory_replies() -> None:
    assert replies.memory(b"\x00\xffA") == b"00ff41"
    assert replies.binary_memory(b"\x90\x90") == b"\x90\x90"
    assert replies.binary_memory(b"") == b"OK"  # lldb's x0,0 probe
    assert replies.unavailable(4) == b"xxxxxxxx"


@FAST
@given(st.binary(min_size=1, max_size=200))
def test_binary_reply_survives_framing(data: bytes) -> None:
    wire = Connection(ack_mode=False).send_packet(replies.binary_memory(data))
    body, _, cs = wire[1:].rpartition(b"#")
    assert int(cs, 16) == sum(body) % 256
    assert decode_payload(body) == data


def test_stop_reply_fields() -> None:
    reply = replies.stop_reply(
        5,
        thread=ThreadId(1, 1),
        core=0,
        reason=StopReason("swbreak"),
        registers={0x10: bytes.fromhex("0010400000000000"), 6: bytes(8)},
        threads=[ThreadId(1), ThreadId(2)],
        thread_pcs=[0x401000, 0x402000],
    )
    assert reply == (
        b"T05thread:1;core:0;swbreak:;10:0010400000000000;06:0000000000000000;"
        b"threads:1,2;thread-pcs:401000,402000;"
    )
    assert replies.stop_reply(5, thread=ThreadId(1, 1), multiprocess=True) == b"T05thread:p1.1;"
    assert replies.stop_reply(2) == b"T02"


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        (StopReason("hwbreak"), b"hwbreak:;"),
        (StopReason("watch", 0x1000), b"watch:1000;"),
        (StopReason("rwatch", 0xFFFF800000000000), b"rwatch:ffff800000000000;"),
        (StopReason("awatch", 0), b"awatch:0;"),
    ],
)
def test_stop_reasons(reason: StopReason, text: bytes) -> None:
    assert replies.stop_reply(5, reason=reason) == b"T05" + text


def test_bad_stop_replies_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        StopReason("watch")
    with pytest.raises(LocalProtocolError):
        StopReason("swbreak", 0x1000)
    with pytest.raises(LocalProtocolError):
        StopReason("trap")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        replies.stop_reply(256)
    with pytest.raises(LocalProtocolError):
        replies.stop_reply(5, thread_pcs=[-1])


def test_exit_and_console_replies() -> None:
    assert replies.exited(0) == b"W00"
    assert replies.exited(1, pid=0x2A) == b"W01;process:2a"
    assert replies.terminated(9) == b"X09"
    assert replies.console_output("hi\n") == b"O68690a"
    with pytest.raises(LocalProtocolError):
        replies.console_output("")
    with pytest.raises(LocalProtocolError):
        replies.exited(-1)


def test_supported_reply() -> None:
    reply = replies.supported(
        {
            "PacketSize": 0x4000,
            "qXfer:features:read": True,
            "QStartNoAckMode": True,
            "multiprocess": False,
            "vContSupported": True,
            "swbreak": True,
        }
    )
    assert reply == (
        b"PacketSize=4000;qXfer:features:read+;QStartNoAckMode+;multiprocess-;"
        b"vContSupported+;swbreak+"
    )
    with pytest.raises(LocalProtocolError):
        replies.supported({"a;b": True})
    with pytest.raises(LocalProtocolError):
        replies.supported({"x": "1;2"})


def test_thread_list_and_current_thread() -> None:
    assert replies.thread_list([ThreadId(1), ThreadId(2), ThreadId(0x1F)]) == b"m1,2,1f"
    assert replies.thread_list([ThreadId(1, 1)], multiprocess=True) == b"mp1.1"
    assert replies.thread_list([]) == b"l"
    assert replies.current_thread(ThreadId(3)) == b"QC3"


def test_xfer_read_chunks() -> None:
    doc = b"<target>x</target>"
    assert replies.xfer_read(doc, 0, 8) == b"m<target>"
    assert replies.xfer_read(doc, 8, 100) == b"lx</target>"
    assert replies.xfer_read(doc, 0, len(doc)) == b"l" + doc
    assert replies.xfer_read(doc, 100, 10) == b"l"
    # Reassembling the chunks the way gdb does gives the document back.
    got, offset = b"", 0
    while True:
        chunk = replies.xfer_read(doc, offset, 5)
        got += chunk[1:]
        offset += len(chunk) - 1
        if chunk[:1] == b"l":
            break
    assert got == doc


def test_key_values() -> None:
    assert replies.key_values({"start": "1000", "size": "2000", "permissions": "rx"}) == (
        b"start:1000;size:2000;permissions:rx;"
    )
    with pytest.raises(LocalProtocolError):
        replies.key_values({"name": "a;b"})
    with pytest.raises(LocalProtocolError):
        replies.key_values({"bad key": "1"})
