"""Packet framing: ``$payload#cs``, binary escapes, run-length encoding, byte scanning.

Everything here follows the "Overview" section of the GDB manual's Remote Protocol
appendix.  :class:`FrameReader` splits a byte stream into tokens (frames and the
one-byte ``+``, ``-`` and 0x03 controls); it knows nothing of ack modes, which the
connection applies on top.
"""

from __future__ import annotations

import enum
import re
import zlib
from dataclasses import dataclass

from xendbg.errors import RemoteProtocolError

__all__ = [
    "MAX_INCOMING_PAYLOAD",
    "Control",
    "Frame",
    "FrameReader",
    "checksum",
    "decode_payload",
    "encode_frame",
    "encode_payload",
]

# Generous on purpose: we advertise a much smaller PacketSize, but a client that
# overshoots a little is better served than dropped.  Beyond this the peer is broken.
MAX_INCOMING_PAYLOAD = 1 << 20

_ESCAPE = 0x7D  # '}'
_RLE_MARK = 0x2A  # '*'
_XOR = 0x20
_RLE_BIAS = 29  # a repeat count n travels as chr(n + 29)
_RLE_MIN, _RLE_MAX = 3, 97  # count characters ' ' .. '~'
# Counts whose character is '#' or '$' are forbidden by the manual; '*' and '}' are
# avoided too so that no decoder can mistake the count for a marker or an escape.
_RLE_BAD_COUNTS = frozenset(c - _RLE_BIAS for c in b"#$*}")

_NEEDS_ESCAPE = re.compile(rb"[#$}*]")
# Runs of >= 4 identical bytes that need no escape: the only runs RLE may shorten.
# gdb expands '*' on the raw (escaped) text while lldb expands the decoded byte, so
# an escaped byte is never run-length encoded: both readings then agree.
_RUN = re.compile(rb"([^#$}*])\1{3,}", re.DOTALL)
_DECODE_MARK = re.compile(rb"[}*]")
_OUTSIDE = re.compile(rb"[$+\-\x03]")
_INSIDE = re.compile(rb"[#$]")


def checksum(data: bytes) -> int:
    """The modulo-256 sum of the bytes between ``$`` and ``#``."""
    if len(data) <= _ADLER_CHUNK:
        return sum(data) & 0xFF
    # Adler-32's first half is 1 + the byte sum mod 65521; over at most 256 bytes
    # (255 * 256 + 1 < 65521) it never wraps, so C sums each chunk for us.
    total = 0
    view = memoryview(data)
    for i in range(0, len(data), _ADLER_CHUNK):
        total += (zlib.adler32(view[i : i + _ADLER_CHUNK]) & 0xFFFF) - 1
    return total & 0xFF


_ADLER_CHUNK = 256


def _escape(data: bytes) -> bytes:
    # Most payloads (hex memory and registers) have nothing to escape: four memchr
    # scans beat one regex pass by an order of magnitude.
    if b"#" not in data and b"$" not in data and b"}" not in data and b"*" not in data:
        return data
    return _NEEDS_ESCAPE.sub(lambda m: bytes((_ESCAPE, m[0][0] ^ _XOR)), data)


def _rle_run(byte: int, length: int) -> bytes:
    out = bytearray()
    remaining = length
    while remaining:
        out.append(byte)
        remaining -= 1
        n = min(remaining, _RLE_MAX)
        while n in _RLE_BAD_COUNTS:
            n -= 1
        if n >= _RLE_MIN:
            out += bytes((_RLE_MARK, n + _RLE_BIAS))
            remaining -= n
    return bytes(out)


def encode_payload(payload: bytes, rle: bool = False) -> bytes:
    """Escape ``# $ } *`` and, if ``rle``, run-length encode runs of plain bytes."""
    if not rle:
        return _escape(payload)
    out = bytearray()
    pos = 0
    for m in _RUN.finditer(payload):
        out += _escape(payload[pos : m.start()])
        out += _rle_run(payload[m.start()], m.end() - m.start())
        pos = m.end()
    out += _escape(payload[pos:])
    return bytes(out)


def encode_frame(payload: bytes, rle: bool = False) -> bytes:
    """The complete ``$…#cs`` frame for ``payload``."""
    body = encode_payload(payload, rle)
    return b"$" + body + b"#%02x" % checksum(body)


def decode_payload(wire: bytes, limit: int = MAX_INCOMING_PAYLOAD) -> bytes:
    """Undo escapes and run-length encoding in one pass.

    A ``*`` repeats the previously *decoded* byte (lldb's reading; for the runs that
    encoders produce it is also gdb's).  A dangling ``}``/``*``, a ``*`` with nothing
    before it, a count outside ``' '..'~'`` or an expansion beyond ``limit`` raise
    :class:`RemoteProtocolError`: the framing itself is broken.
    """
    if _DECODE_MARK.search(wire) is None:
        return wire
    out = bytearray()
    pos = 0
    end = len(wire)
    while True:
        m = _DECODE_MARK.search(wire, pos)
        if m is None:
            out += wire[pos:]
            break
        i = m.start()
        out += wire[pos:i]
        if i + 1 >= end:
            raise RemoteProtocolError(f"packet ends inside an escape or repeat at offset {i}")
        arg = wire[i + 1]
        if wire[i] == _ESCAPE:
            out.append(arg ^ _XOR)
        else:
            if not out:
                raise RemoteProtocolError("run-length repeat with no character to repeat")
            count = arg - _RLE_BIAS
            if not _RLE_MIN <= count <= _RLE_MAX:
                raise RemoteProtocolError(f"run-length count character {arg:#04x} out of range")
            out += bytes((out[-1],)) * count
            if len(out) > limit:
                raise RemoteProtocolError("run-length expansion exceeds the packet size limit")
        pos = i + 2
    return bytes(out)


class Control(enum.IntEnum):
    """The one-byte messages that travel outside packets."""

    ACK = 0x2B  # '+'
    NAK = 0x2D  # '-'
    INTERRUPT = 0x03  # ^C: gdb's "interrupt the target" request


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete ``$wire#cs`` frame; ``wire`` is still escaped/run-length encoded."""

    wire: bytes
    checksum_ok: bool


_CHECKSUM = re.compile(rb"[0-9a-fA-F]{2}")


def _parse_checksum(text: bytes) -> int:
    # Two hex digits; anything else can never match, like a wrong sum.
    return int(text, 16) if _CHECKSUM.fullmatch(text) else -1


class FrameReader:
    """Incremental scanner: feed bytes, pull tokens.  Each byte is scanned once.

    Outside a packet only ``$``, ``+``, ``-`` and 0x03 mean something; everything else
    is junk and dropped, as the manual allows (this includes ``%`` notifications, which
    only stubs may send).  A ``$`` inside a packet abandons the partial packet and
    starts a new one, as gdb's own reader does.
    """

    def __init__(self, max_payload: int = MAX_INCOMING_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._start = -1  # index of the current packet's '$', or -1 outside a packet
        self._scan = 0  # bytes before this index were already scanned

    @property
    def in_packet(self) -> bool:
        """True when a packet has started but is not complete."""
        return self._start >= 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_token(self) -> Frame | Control | None:
        """The next token, or None when more bytes are needed."""
        buf = self._buf
        while True:
            if self._start < 0:
                m = _OUTSIDE.search(buf, self._scan)
                if m is None:
                    buf.clear()
                    self._scan = 0
                    return None
                pos = m.start()
                byte = buf[pos]
                if byte == 0x24:  # '$'
                    self._start = pos
                    self._scan = pos + 1
                    continue
                del buf[: pos + 1]
                self._scan = 0
                return Control(byte)
            m = _INSIDE.search(buf, self._scan)
            stop = len(buf) if m is None else m.start()
            if stop - self._start - 1 > self.max_payload:
                raise RemoteProtocolError(f"packet longer than {self.max_payload} bytes")
            if m is None:
                self._scan = stop
                return None
            if buf[stop] == 0x24:  # '$' inside a packet: resynchronise on it
                self._start = stop
                self._scan = stop + 1
                continue
            if len(buf) < stop + 3:
                self._scan = stop  # rescan from '#' once the checksum digits arrive
                return None
            wire = bytes(buf[self._start + 1 : stop])
            ok = _parse_checksum(bytes(buf[stop + 1 : stop + 3])) == checksum(wire)
            del buf[: stop + 3]
            self._start = -1
            self._scan = 0
            return Frame(wire, ok)
