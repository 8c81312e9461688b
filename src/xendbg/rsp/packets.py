"""Payload parsing: one decoded packet payload in, one typed request out.

:func:`parse_request` never raises.  An unimplemented packet becomes ``Unknown`` (the
stub answers with an empty packet, the manual's "not supported"); a known packet with
bad arguments becomes ``Malformed`` (the stub answers ``E..``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from xendbg.rsp.fields import (
    PayloadError,
    ThreadId,
    hex_decode,
    parse_hex_int,
    parse_signal,
)
from xendbg.rsp.requests import (
    Attached,
    BreakpointType,
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
    Supported,
    Symbol,
    ThreadAlive,
    ThreadExtraInfo,
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
)

__all__ = ["parse_request"]

_Parser = Callable[[bytes, bytes], Request]  # (whole payload, arguments) -> request

_FIXED: dict[bytes, Request] = {
    b"?": QueryHaltReason(),
    b"k": Kill(),
    b"qC": CurrentThread(),
    b"qfThreadInfo": ThreadInfoFirst(),
    b"qsThreadInfo": ThreadInfoNext(),
    b"qHostInfo": HostInfo(),
    b"qProcessInfo": ProcessInfo(),
    b"qTStatus": TraceStatus(),
    b"qOffsets": Offsets(),
    b"qWatchpointSupportInfo": WatchpointSupportInfo(),
    b"qWatchpointSupportInfo:": WatchpointSupportInfo(),
    b"jThreadsInfo": ThreadsInfo(),
    b"vCont?": VContQuery(),
    b"vMustReplyEmpty": MustReplyEmpty(),
    b"QStartNoAckMode": StartNoAckMode(),
    b"QThreadSuffixSupported": ThreadSuffixSupported(),
    b"QListThreadsInStopReply": ListThreadsInStopReply(),
    b"QEnableErrorStrings": EnableErrorStrings(),
}


def parse_request(payload: bytes) -> Request:
    """Parse a decoded payload (escapes and RLE already undone).  Never raises."""
    payload = bytes(payload)
    fixed = _FIXED.get(payload)
    if fixed is not None:
        return fixed
    parser, args = _lookup(payload)
    if parser is None:
        return Unknown(payload)
    try:
        return parser(payload, args)
    except PayloadError as exc:
        return Malformed(payload, str(exc))


def _lookup(payload: bytes) -> tuple[_Parser | None, bytes]:
    first = payload[:1]
    if first in (b"q", b"v"):
        for name, parser in _NAMED:
            if payload.startswith(name):
                return parser, payload[len(name) :]
        return None, b""
    return _LETTERS.get(first), payload[1:]


# --- small helpers -------------------------------------------------------------------


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise PayloadError(f"non-ASCII {what}") from None


def _addr_length(args: bytes) -> tuple[int, int]:
    addr, comma, length = args.partition(b",")
    if not comma:
        raise PayloadError("expected addr,length")
    return parse_hex_int(addr, "address"), parse_hex_int(length, "length")


def _optional_addr(args: bytes) -> int | None:
    return parse_hex_int(args, "address") if args else None


def _optional_pid(args: bytes, sep: bytes) -> int | None:
    if not args:
        return None
    if not args.startswith(sep):
        raise PayloadError(f"expected {sep.decode()}pid")
    return parse_hex_int(args[len(sep) :], "process id")


def _split_thread_suffix(args: bytes) -> tuple[bytes, ThreadId | None]:
    """Split lldb's ``;thread:TID;`` suffix off the arguments of g, G, p and P."""
    body, sep, suffix = args.partition(b";thread:")
    if not sep:
        if b";" in args:
            raise PayloadError("unexpected ';' (only a ;thread: suffix is allowed)")
        return args, None
    suffix = suffix.removesuffix(b";")
    return body, ThreadId.parse(suffix)


def _breakpoint_head(args: bytes) -> tuple[BreakpointType, int, int]:
    fields = args.split(b",")
    if len(fields) != 3:
        raise PayloadError("expected type,addr,kind")
    kind_no = parse_hex_int(fields[0], "breakpoint type")
    if kind_no > BreakpointType.ACCESS_WATCHPOINT:
        raise PayloadError(f"breakpoint type {kind_no} does not exist")
    return (
        BreakpointType(kind_no),
        parse_hex_int(fields[1], "address"),
        parse_hex_int(fields[2], "kind"),
    )


# --- one parser per packet -----------------------------------------------------------


def _g(payload: bytes, args: bytes) -> Request:
    body, thread = _split_thread_suffix(args)
    if body:
        raise PayloadError("g takes no arguments")
    return ReadRegisters(thread)


def _big_g(payload: bytes, args: bytes) -> Request:
    body, thread = _split_thread_suffix(args)
    return WriteRegisters(hex_decode(body, "register block"), thread)


def _p(payload: bytes, args: bytes) -> Request:
    body, thread = _split_thread_suffix(args)
    return ReadRegister(parse_hex_int(body, "register number"), thread)


def _big_p(payload: bytes, args: bytes) -> Request:
    body, thread = _split_thread_suffix(args)
    regno, eq, value = body.partition(b"=")
    if not eq:
        raise PayloadError("expected n=value")
    return WriteRegister(parse_hex_int(regno, "register number"), hex_decode(value), thread)


def _m(payload: bytes, args: bytes) -> Request:
    return ReadMemory(*_addr_length(args))


def _x(payload: bytes, args: bytes) -> Request:
    return ReadMemoryBinary(*_addr_length(args))


def _write(args: bytes, binary: bool) -> tuple[int, bytes]:
    head, colon, data = args.partition(b":")
    if not colon:
        raise PayloadError("expected addr,length:data")
    addr, length = _addr_length(head)
    if not binary:
        data = hex_decode(data, "memory data")
    if len(data) != length:
        raise PayloadError(f"length {length:#x} but {len(data):#x} bytes of data")
    return addr, data


def _big_m(payload: bytes, args: bytes) -> Request:
    return WriteMemory(*_write(args, binary=False))


def _big_x(payload: bytes, args: bytes) -> Request:
    return WriteMemoryBinary(*_write(args, binary=True))


def _c(payload: bytes, args: bytes) -> Request:
    return Continue(_optional_addr(args))


def _s(payload: bytes, args: bytes) -> Request:
    return Step(_optional_addr(args))


def _signal_addr(args: bytes) -> tuple[int, int | None]:
    sig, semi, addr = args.partition(b";")
    return parse_signal(sig), (parse_hex_int(addr, "address") if semi else None)


def _big_c(payload: bytes, args: bytes) -> Request:
    return ContinueWithSignal(*_signal_addr(args))


def _big_s(payload: bytes, args: bytes) -> Request:
    return StepWithSignal(*_signal_addr(args))


def _z(payload: bytes, args: bytes) -> Request:
    return RemoveBreakpoint(*_breakpoint_head(args))


def _big_z(payload: bytes, args: bytes) -> Request:
    head, *tail = args.split(b";")
    return InsertBreakpoint(*_breakpoint_head(head), conditions=tuple(tail))


def _h(payload: bytes, args: bytes) -> Request:
    op = args[:1]
    if op not in (b"g", b"c"):
        raise PayloadError("H op must be g or c")
    return SetThread(op.decode(), ThreadId.parse(args[1:]))


def _t(payload: bytes, args: bytes) -> Request:
    return ThreadAlive(ThreadId.parse(args))


def _d(payload: bytes, args: bytes) -> Request:
    return Detach(_optional_pid(args, b";"))


def _vkill(payload: bytes, args: bytes) -> Request:
    return VKill(_optional_pid(args, b";"))


def _vcont_action(text: bytes) -> VContAction:
    action, colon, tid = text.partition(b":")
    thread = ThreadId.parse(tid) if colon else None
    letter, rest = action[:1], action[1:]
    if letter in (b"c", b"s", b"t") and not rest:
        return VContAction(letter.decode(), thread)
    if letter in (b"C", b"S"):
        return VContAction(letter.decode(), thread, signal=parse_signal(rest))
    if letter == b"r":
        start, end = _addr_length(rest)
        return VContAction("r", thread, start=start, end=end)
    raise PayloadError(f"unknown vCont action {action[:20]!r}")


def _vcont(payload: bytes, args: bytes) -> Request:
    if not args:
        raise PayloadError("vCont without actions")
    return VCont(tuple(_vcont_action(a) for a in args.split(b";")))


def _supported(payload: bytes, args: bytes) -> Request:
    if args and not args.startswith(b":"):
        return Unknown(payload)
    features: dict[str, str] = {}
    for item in args[1:].split(b";"):
        if not item:
            continue
        name, eq, value = item.partition(b"=")
        if eq:
            features[_text(name, "feature name")] = _text(value, "feature value")
        elif item[-1:] in (b"+", b"-", b"?"):
            features[_text(item[:-1], "feature name")] = _text(item[-1:], "feature")
        else:
            features[_text(item, "feature name")] = ""
    return Supported(MappingProxyType(features))


def _attached(payload: bytes, args: bytes) -> Request:
    if args and not args.startswith(b":"):
        return Unknown(payload)
    return Attached(_optional_pid(args, b":"))


def _xfer(payload: bytes, args: bytes) -> Request:
    obj, _, rest = args.partition(b":")
    op, _, rest = rest.partition(b":")
    if op != b"read":
        return Unknown(payload)  # writes and unknown operations: not supported
    annex, colon, span = rest.rpartition(b":")
    if not colon:
        raise PayloadError("expected qXfer:object:read:annex:offset,length")
    offset, length = _addr_length(span)
    return XferRead(_text(obj, "object"), _text(annex, "annex"), offset, length)


def _thread_extra_info(payload: bytes, args: bytes) -> Request:
    return ThreadExtraInfo(ThreadId.parse(args))


def _memory_region_info(payload: bytes, args: bytes) -> Request:
    return MemoryRegionInfo(parse_hex_int(args, "address"))


def _register_info(payload: bytes, args: bytes) -> Request:
    return RegisterInfo(parse_hex_int(args, "register number"))


def _rcmd(payload: bytes, args: bytes) -> Request:
    try:
        command = hex_decode(args, "command").decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("monitor command is not UTF-8") from None
    return MonitorCommand(command)


def _symbol(payload: bytes, args: bytes) -> Request:
    value, colon, name = args.partition(b":")
    if not colon:
        raise PayloadError("expected qSymbol:value:name")
    if not value and not name:
        return Symbol()
    try:
        text = hex_decode(name, "symbol name").decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("symbol name is not UTF-8") from None
    return Symbol(parse_hex_int(value, "symbol value") if value else None, text)


# Named packets, longest-first where one name prefixes another.
_NAMED: tuple[tuple[bytes, _Parser], ...] = (
    (b"qSupported", _supported),
    (b"qAttached", _attached),
    (b"qXfer:", _xfer),
    (b"qThreadExtraInfo,", _thread_extra_info),
    (b"qMemoryRegionInfo:", _memory_region_info),
    (b"qRegisterInfo", _register_info),
    (b"qRcmd,", _rcmd),
    (b"qSymbol:", _symbol),
    (b"vCont;", _vcont),
    (b"vKill", _vkill),
)

# Single-letter packets (q, Q, v and j packets are all named above or unknown).
_LETTERS: dict[bytes, _Parser] = {
    b"g": _g,
    b"G": _big_g,
    b"p": _p,
    b"P": _big_p,
    b"m": _m,
    b"M": _big_m,
    b"x": _x,
    b"X": _big_x,
    b"c": _c,
    b"C": _big_c,
    b"s": _s,
    b"S": _big_s,
    b"z": _z,
    b"Z": _big_z,
    b"H": _h,
    b"T": _t,
    b"D": _d,
}
