"""Plain-text formatting of values and memory, shared by print, examine and the context view."""

from __future__ import annotations

from collections.abc import Callable

from xendbg.errors import XendbgError

FORMATS = ("x", "d", "u", "o", "t", "b", "c")
UNITS = {"b": 1, "h": 2, "w": 4, "g": 8}
PER_ROW = {1: 8, 2: 8, 4: 4, 8: 2}  # values per examine row, as GDB's x


def signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def format_value(value: int, fmt: str = "x", bits: int = 64, *, pad: bool = False) -> str:
    """``value`` in format ``fmt`` (x hex, d signed, u unsigned, o octal, t/b binary,
    c character), as a ``bits``-bit quantity.  ``pad`` zero-fills hex to the width."""
    v = value & ((1 << bits) - 1)
    if fmt == "x":
        return f"{v:#0{bits // 4 + 2}x}" if pad else f"{v:#x}"
    if fmt == "d":
        return str(signed(v, bits))
    if fmt == "u":
        return str(v)
    if fmt == "o":
        return f"0{v:o}" if v else "0"
    if fmt in ("t", "b"):
        return f"{v:#0{bits + 2}b}" if pad else f"{v:#b}"
    if fmt == "c":
        ch = v & 0xFF
        shown = chr(ch) if 0x20 <= ch < 0x7F else f"\\x{ch:02x}"
        return f"{ch} '{shown}'"
    raise XendbgError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def parse_slash_format(spec: str) -> tuple[int | None, str | None, int | None]:
    """GDB's ``/NFU`` (count, format letter, unit size) from ``4gx``-like text."""
    digits = ""
    fmt = unit = None
    for i, ch in enumerate(spec):
        if ch.isdigit() and fmt is None and unit is None:
            digits += ch
        elif (
            ch in UNITS
            and unit is None
            and not (ch == "b" and fmt is None and _binary_hint(spec, i))
        ):
            unit = UNITS[ch]
        elif ch in FORMATS and fmt is None:
            fmt = ch
        else:
            raise XendbgError(
                f"bad /FORMAT {spec!r}: count, then format letters "
                f"{''.join(FORMATS)} and size letters bhwg"
            )
    return (int(digits) if digits else None), fmt, unit


def _binary_hint(spec: str, i: int) -> bool:
    # 'b' is both a size (byte) and, for xendbg's `-f b`, binary; in /FMT it is
    # the size unless a size letter follows (e.g. /bw: binary words).
    return any(c in "hwg" for c in spec[i + 1 :])


ReadFn = Callable[[int, int], bytes]


def examine_rows(
    data: bytes, addr: int, unit: int, fmt: str, describe: Callable[[int], str | None]
) -> list[str]:
    """``0xADDR <sym+off>:  v v v`` rows of ``data`` read at ``addr``, ``unit``-byte values."""
    rows: list[str] = []
    step = PER_ROW[unit] * unit
    for off in range(0, len(data), step):
        chunk = data[off : off + step]
        vals = [int.from_bytes(chunk[i : i + unit], "little") for i in range(0, len(chunk), unit)]
        where = addr + off
        name = describe(where)
        head = f"{where:#x}" + (f" <{name}>" if name else "") + ":"
        rows.append(
            head
            + "  "
            + "  ".join(format_value(v, fmt, unit * 8, pad=fmt in ("x", "t", "b")) for v in vals)
        )
    return rows
