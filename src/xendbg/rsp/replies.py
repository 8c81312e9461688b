"""Reply payload builders.  They return payloads; framing and escaping happen in send.

Binary replies (``x`` data, ``qXfer`` chunks) are returned raw: the framing layer
escapes ``# $ } *`` in every packet it sends, which both gdb and lldb undo.
Out-of-range arguments raise :class:`LocalProtocolError`: we must not send them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from xendbg.errors import LocalProtocolError
from xendbg.rsp.fields import ThreadId, hex_encode

__all__ = [
    "EMPTY",
    "OK",
    "StopReason",
    "binary_memory",
    "console_output",
    "current_thread",
    "error",
    "exited",
    "key_values",
    "memory",
    "stop_reply",
    "supported",
    "terminated",
    "thread_list",
    "unavailable",
    "xfer_read",
]

OK = b"OK"
EMPTY = b""  # "packet not supported"

_KEY = re.compile(r"[A-Za-z0-9_\-.]+")
_FEATURE = re.compile(r"[A-Za-z0-9_\-.:]+")  # qXfer:features:read has colons
_VALUE = re.compile(r"[\x20-\x7e]*")  # printable ASCII


def _value(value: str, what: str) -> bytes:
    if ";" in value or _VALUE.fullmatch(value) is None:
        raise LocalProtocolError(f"{what}: value {value!r} is not printable ASCII without ';'")
    return value.encode("ascii")


def _byte(value: int, what: str) -> int:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"{what} {value} does not fit in one byte")
    return value


def _hex_u64(value: int, what: str) -> bytes:
    if not 0 <= value < 1 << 64:
        raise LocalProtocolError(f"{what} {value:#x} is not a 64-bit unsigned value")
    return b"%x" % value


def error(code: int, message: str | None = None) -> bytes:
    """``Enn``, or lldb's ``Enn;hex-text`` once QEnableErrorStrings was answered OK."""
    out = b"E%02x" % _byte(code, "error code")
    if message is not None:
        out += b";" + hex_encode(message.encode("utf-8"))
    return out


def memory(data: bytes) -> bytes:
    """``m`` reply: the bytes in hex."""
    return hex_encode(data)


def binary_memory(data: bytes) -> bytes:
    """``x`` reply: the raw bytes (lldb 14 wants binary; escaping happens when framed).

    A zero-length read answers ``OK``: that is how lldb probes ``x`` support
    (``x0,0``) and how it tells "supported" from "empty".
    """
    return bytes(data) if data else OK


def unavailable(size: int) -> bytes:
    """``xx`` per byte: a register (or part of ``g``) whose value is unknown."""
    return b"xx" * size


@dataclass(frozen=True, slots=True)
class StopReason:
    """The stop-reason field of a ``T`` stop reply (GDB manual, "Stop Reply Packets").

    ``swbreak``/``hwbreak`` take no address (only send them if the client announced
    the feature in qSupported); ``watch``/``rwatch``/``awatch`` need the data address.
    """

    kind: Literal["swbreak", "hwbreak", "watch", "rwatch", "awatch"]
    addr: int | None = None

    def __post_init__(self) -> None:
        is_watch = self.kind in ("watch", "rwatch", "awatch")
        if self.kind not in ("swbreak", "hwbreak") and not is_watch:
            raise LocalProtocolError(f"unknown stop reason {self.kind!r}")
        if is_watch != (self.addr is not None):
            raise LocalProtocolError(f"{self.kind} stop reason: address given iff watchpoint")

    def encode(self) -> bytes:
        value = b"" if self.addr is None else _hex_u64(self.addr, "watch address")
        return self.kind.encode() + b":" + value + b";"


def stop_reply(
    signal: int,
    *,
    thread: ThreadId | None = None,
    core: int | None = None,
    reason: StopReason | None = None,
    registers: Mapping[int, bytes] | None = None,
    threads: Sequence[ThreadId] | None = None,
    thread_pcs: Sequence[int] | None = None,
    multiprocess: bool = False,
) -> bytes:
    """``T sig n:r;…``: the stop reply for ``?``, ``c``, ``s``, ``vCont`` and ^C.

    ``registers`` maps a register number (GDB/target.xml order) to its value in
    target byte order.  ``threads`` and ``thread_pcs`` are lldb's
    QListThreadsInStopReply fields.
    """
    out = bytearray(b"T%02x" % _byte(signal, "signal"))
    if thread is not None:
        out += b"thread:" + thread.encode(multiprocess) + b";"
    if core is not None:
        out += b"core:" + _hex_u64(core, "core") + b";"
    if reason is not None:
        out += reason.encode()
    for regno, value in (registers or {}).items():
        out += b"%02x:" % _byte(regno, "register number") + hex_encode(value) + b";"
    if threads is not None:
        out += b"threads:" + b",".join(t.encode(multiprocess) for t in threads) + b";"
    if thread_pcs is not None:
        out += b"thread-pcs:" + b",".join(_hex_u64(pc, "pc") for pc in thread_pcs) + b";"
    return bytes(out)


def _process_suffix(pid: int | None) -> bytes:
    return b"" if pid is None else b";process:" + _hex_u64(pid, "process id")


def exited(status: int, pid: int | None = None) -> bytes:
    """``W xx[;process:pid]``: the target exited with ``status``."""
    return b"W%02x" % _byte(status, "exit status") + _process_suffix(pid)


def terminated(signal: int, pid: int | None = None) -> bytes:
    """``X xx[;process:pid]``: the target was terminated by ``signal``."""
    return b"X%02x" % _byte(signal, "signal") + _process_suffix(pid)


def console_output(text: str | bytes) -> bytes:
    """``O hex``: text for the debugger console (e.g. ``monitor`` output)."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not raw:
        raise LocalProtocolError("an empty O packet would read as a stop reply")
    return b"O" + hex_encode(raw)


def supported(features: Mapping[str, bool | int | str]) -> bytes:
    """qSupported reply: ``True`` → ``name+``, ``False`` → ``name-``,
    ``int`` → ``name=hex`` (PacketSize is hex), ``str`` → ``name=value``."""
    parts: list[bytes] = []
    for name, value in features.items():
        if _FEATURE.fullmatch(name) is None:
            raise LocalProtocolError(f"bad qSupported feature name {name!r}")
        key = name.encode("ascii")
        if isinstance(value, bool):
            parts.append(key + (b"+" if value else b"-"))
        elif isinstance(value, int):
            parts.append(key + b"=" + _hex_u64(value, name))
        else:
            parts.append(key + b"=" + _value(value, name))
    return b";".join(parts)


def thread_list(threads: Iterable[ThreadId], multiprocess: bool = False) -> bytes:
    """qfThreadInfo/qsThreadInfo reply: ``m1,2,3``, or ``l`` once the list is done."""
    ids = [t.encode(multiprocess) for t in threads]
    return b"m" + b",".join(ids) if ids else b"l"


def current_thread(thread: ThreadId, multiprocess: bool = False) -> bytes:
    """qC reply."""
    return b"QC" + thread.encode(multiprocess)


def xfer_read(document: bytes, offset: int, length: int) -> bytes:
    """qXfer read reply: ``m`` + chunk while more follows, ``l`` + chunk at the end."""
    if offset < 0 or length < 0:
        raise LocalProtocolError("negative qXfer offset or length")
    chunk = document[offset : offset + length]
    more = offset + length < len(document)
    return (b"m" if more else b"l") + chunk


def key_values(pairs: Mapping[str, str]) -> bytes:
    """``key:value;…`` replies (qHostInfo, qProcessInfo, qMemoryRegionInfo...).

    Values are sent as given: the caller picks decimal, hex or hex-encoded text as the
    lldb documentation specifies for each key.
    """
    out = bytearray()
    for key, value in pairs.items():
        if _KEY.fullmatch(key) is None:
            raise LocalProtocolError(f"bad key {key!r}")
        out += key.encode("ascii") + b":" + _value(value, key) + b";"
    return bytes(out)
