"""Field syntaxes shared by requests and replies: hex numbers, hex data, thread ids.

Parsers raise :class:`PayloadError` (a ``ValueError``); :mod:`xendbg.rsp.packets` turns
it into a ``Malformed`` request, so a bad field is a reply-level error, never a crash.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import ClassVar

from xendbg.errors import LocalProtocolError

__all__ = [
    "PayloadError",
    "ThreadId",
    "hex_decode",
    "hex_encode",
    "parse_hex_int",
    "parse_signal",
]

_HEX_DIGITS = re.compile(rb"[0-9a-fA-F]+")
# Addresses and lengths are at most 64-bit; refuse longer numbers before converting.
_MAX_HEX_DIGITS = 32
_U64_LIMIT = 1 << 64


class PayloadError(ValueError):
    """A field inside a well-framed packet does not follow the packet's syntax."""


def parse_hex_int(text: bytes, what: str = "number") -> int:
    """Parse an unsigned hex number (no sign, no ``0x``, no blanks) of at most 64 bits."""
    if len(text) > _MAX_HEX_DIGITS or _HEX_DIGITS.fullmatch(text) is None:
        raise PayloadError(f"bad hex {what}: {text[:40]!r}")
    value = int(text, 16)
    if value >= _U64_LIMIT:
        raise PayloadError(f"{what} does not fit in 64 bits")
    return value


def parse_signal(text: bytes) -> int:
    """Parse a signal number as sent in ``C``/``S``/``vCont`` (one byte, hex)."""
    value = parse_hex_int(text, "signal")
    if value > 0xFF:
        raise PayloadError(f"signal {value:#x} out of range")
    return value


def hex_decode(text: bytes, what: str = "data") -> bytes:
    """Decode hex-encoded bytes (``M`` data, ``G`` block, ``qRcmd`` text...)."""
    try:
        return binascii.a2b_hex(text)
    except binascii.Error as exc:
        raise PayloadError(f"bad hex {what}: {exc}") from None


def hex_encode(data: bytes) -> bytes:
    """Encode bytes as lowercase hex, two digits per byte."""
    return binascii.b2a_hex(data)


def _parse_id(text: bytes, what: str) -> int:
    # -1 ("all") is the only negative value the thread-id syntax allows.
    if text == b"-1":
        return -1
    return parse_hex_int(text, what)


@dataclass(frozen=True, slots=True)
class ThreadId:
    """A GDB thread-id: ``tid``, or ``p<pid>.<tid>`` with the multiprocess extension.

    ``tid`` (and ``pid``) is -1 for "all", 0 for "any", or a positive id.  ``pid`` is
    None unless the client used the multiprocess form.  ``p<pid>`` alone means all
    threads of that process (``tid == -1``), as the GDB manual's thread-id syntax says.
    """

    tid: int
    pid: int | None = None

    ALL: ClassVar[ThreadId]
    ANY: ClassVar[ThreadId]

    def __post_init__(self) -> None:
        if self.tid < -1 or (self.pid is not None and self.pid < -1):
            raise LocalProtocolError(f"invalid thread id {self.pid}.{self.tid}")

    @property
    def is_all(self) -> bool:
        return self.tid == -1

    @property
    def is_any(self) -> bool:
        return self.tid == 0

    @classmethod
    def parse(cls, text: bytes) -> ThreadId:
        """Parse ``-1``, ``0``, ``1a``, ``p1.1a``, ``p1`` or ``p-1.-1``; raise PayloadError."""
        if text.startswith(b"p"):
            pid_text, dot, tid_text = text[1:].partition(b".")
            pid = _parse_id(pid_text, "process id")
            tid = _parse_id(tid_text, "thread id") if dot else -1
            return cls(tid, pid)
        return cls(_parse_id(text, "thread id"))

    def encode(self, multiprocess: bool = False) -> bytes:
        """The wire form; ``multiprocess`` selects ``p<pid>.<tid>`` when a pid is known."""
        tid = b"-1" if self.tid == -1 else b"%x" % self.tid
        if multiprocess and self.pid is not None:
            pid = b"-1" if self.pid == -1 else b"%x" % self.pid
            return b"p" + pid + b"." + tid
        return tid


ThreadId.ALL = ThreadId(-1)
ThreadId.ANY = ThreadId(0)
