"""x86 register files as GDB and LLDB see them, and the packets that carry them.

One table per guest word size lists every register in GDB order: the order of the
``g`` packet and of the ``regnum`` attributes in ``target.xml``.  Each row maps a
GDB name to a canonical name of :mod:`xendbg.arch.x86.regnames` (a 32-bit guest's
``eax`` is the low half of ``rax``), so backends never see GDB names.

GDB's i386/amd64 architectures reject a description whose
``org.gnu.gdb.i386.core`` feature lacks ``st0``…``fop`` ("Architecture rejected
target-supplied description", checked with gdb 13), so a layout without FPU
state keeps the x87 registers (always reported unavailable) and drops only the
``org.gnu.gdb.i386.sse`` feature.

Values travel as little-endian bytes (GDB manual, "Packets": ``g``/``p``);
a register the backend did not supply is sent as ``xx`` per byte, which GDB
shows as ``<unavailable>``.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from xendbg.arch.x86.regnames import GPRS64
from xendbg.errors import RemoteProtocolError

CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
SEGMENTS = "org.gnu.gdb.i386.segments"
SYSTEM = "org.xendbg.x86.system"


@dataclass(frozen=True, slots=True)
class RegisterDesc:
    """One register of a layout.

    ``name`` is the GDB name, ``source`` the canonical backend name.  ``regnum``
    is the remote register number (``p``/``P``, ``regnum=`` in target.xml) and
    ``offset`` the byte offset in the ``g`` packet.  ``generic``, ``dwarf`` and
    ``ehframe`` are LLDB's register kinds (SysV psABI DWARF numbers).
    """

    name: str
    source: str
    bitsize: int
    gdb_type: str
    feature: str
    group: str
    regnum: int
    offset: int
    generic: str | None = None
    dwarf: int | None = None
    ehframe: int | None = None

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.bitsize // 8

    @property
    def mask(self) -> int:
        return (1 << self.bitsize) - 1

    @property
    def lldb_encoding(self) -> str:
        return "vector" if self.gdb_type in ("i387_ext", "vec128") else "uint"

    @property
    def lldb_format(self) -> str:
        return "vector-uint8" if self.lldb_encoding == "vector" else "hex"


class RegisterLayout:
    """An ordered register file: ``registers[i].regnum == i``."""

    __slots__ = (
        "_by_name",
        "_by_source",
        "architecture",
        "fpu",
        "g_plan",
        "g_size",
        "registers",
        "word_size",
    )

    def __init__(
        self, architecture: str, word_size: int, fpu: bool, registers: tuple[RegisterDesc, ...]
    ) -> None:
        self.architecture = architecture
        self.word_size = word_size
        self.fpu = fpu
        self.registers = registers
        self.g_size = sum(r.size for r in registers)
        self._by_name = {r.name: r for r in registers}
        self._by_source = {r.source: r for r in registers}
        # (canonical name, size, mask) in g order: the hot path of every stop.
        self.g_plan = tuple((r.source, r.size, r.mask) for r in registers)

    def __len__(self) -> int:
        return len(self.registers)

    def __iter__(self) -> Iterator[RegisterDesc]:
        return iter(self.registers)

    def __repr__(self) -> str:
        return f"<RegisterLayout {self.architecture} fpu={self.fpu} n={len(self.registers)}>"

    def by_regnum(self, regnum: int) -> RegisterDesc:
        """The register with remote number ``regnum``; KeyError if none."""
        if 0 <= regnum < len(self.registers):
            return self.registers[regnum]
        raise KeyError(regnum)

    def by_name(self, name: str) -> RegisterDesc:
        """The register GDB calls ``name`` (``eax``, ``eflags``, ``k_gs_base``…)."""
        return self._by_name[name]

    def by_source(self, source: str) -> RegisterDesc:
        """The register backed by canonical register ``source`` (``rax``, ``rflags``…)."""
        return self._by_source[source]

    def gdb_name(self, source: str) -> str:
        return self._by_source[source].name

    def source_name(self, name: str) -> str:
        return self._by_name[name].source


# -- the tables ----------------------------------------------------------------
# A row: (gdb name, canonical name, bit size, gdb type, lldb generic, DWARF number).
# DWARF numbers: SysV x86-64 psABI figure 3.36 and i386 psABI table 2.14, as
# binutils' readelf names them; eh_frame uses the same numbers on ELF targets.
_Row = tuple[str, str, int, str, str | None, int | None]

_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


def _rows64() -> dict[str, list[_Row]]:
    gpr_dwarf = (0, 3, 2, 1, 4, 5, 6, 7, *range(8, 16))  # rax rbx rcx rdx rsi rdi rbp rsp r8…
    gpr_generic = {"rbp": "fp", "rsp": "sp", "rdi": "arg1", "rsi": "arg2", "rdx": "arg3"}
    gpr_generic |= {"rcx": "arg4", "r8": "arg5", "r9": "arg6"}
    gpr_type = {"rbp": "data_ptr", "rsp": "data_ptr"}
    core: list[_Row] = [
        (n, n, 64, gpr_type.get(n, "int64"), gpr_generic.get(n), d)
        for n, d in zip(GPRS64, gpr_dwarf, strict=True)
    ]
    core += [("rip", "rip", 64, "code_ptr", "pc", 16)]
    core += [("eflags", "rflags", 32, "i386_eflags", "flags", 49)]
    seg_dwarf = {"es": 50, "cs": 51, "ss": 52, "ds": 53, "fs": 54, "gs": 55}
    core += [(s, s, 32, "int32", None, seg_dwarf[s]) for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    core += [(f"st{i}", f"st{i}", 80, "i387_ext", None, 33 + i) for i in range(8)]
    x87_dwarf = {"fctrl": 65, "fstat": 66}
    core += [(n, n, 32, "int", None, x87_dwarf.get(n)) for n in _X87_CONTROL]
    sse: list[_Row] = [(f"xmm{i}", f"xmm{i}", 128, "vec128", None, 17 + i) for i in range(16)]
    sse += [("mxcsr", "mxcsr", 32, "i386_mxcsr", None, 64)]
    segments: list[_Row] = [
        ("fs_base", "fs_base", 64, "int", None, 58),
        ("gs_base", "gs_base", 64, "int", None, 59),
    ]
    system: list[_Row] = [("k_gs_base", "kernel_gs_base", 64, "int", None, None)]
    system += _system_rows(64)
    return {CORE: core, SSE: sse, SEGMENTS: segments, SYSTEM: system}


def _rows32() -> dict[str, list[_Row]]:
    gprs = (
        ("eax", "rax", "int32", None),
        ("ecx", "rcx", "int32", None),
        ("edx", "rdx", "int32", None),
        ("ebx", "rbx", "int32", None),
        ("esp", "rsp", "data_ptr", "sp"),
        ("ebp", "rbp", "data_ptr", "fp"),
        ("esi", "rsi", "int32", None),
        ("edi", "rdi", "int32", None),
    )
    core: list[_Row] = [(n, s, 32, t, g, d) for d, (n, s, t, g) in enumerate(gprs)]
    core += [("eip", "rip", 32, "code_ptr", "pc", 8)]
    core += [("eflags", "rflags", 32, "i386_eflags", "flags", 9)]
    seg_dwarf = {"es": 40, "cs": 41, "ss": 42, "ds": 43, "fs": 44, "gs": 45}
    core += [(s, s, 32, "int32", None, seg_dwarf[s]) for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    core += [(f"st{i}", f"st{i}", 80, "i387_ext", None, 11 + i) for i in range(8)]
    x87_dwarf = {"fctrl": 37, "fstat": 38}
    core += [(n, n, 32, "int", None, x87_dwarf.get(n)) for n in _X87_CONTROL]
    sse: list[_Row] = [(f"xmm{i}", f"xmm{i}", 128, "vec128", None, 21 + i) for i in range(8)]
    sse += [("mxcsr", "mxcsr", 32, "i386_mxcsr", None, 39)]
    # gdb 13 aborts (internal-error in tdesc_use_registers) on a 32-bit
    # org.gnu.gdb.i386.segments feature without the AVX-512/PKU features, so the
    # bases go to our system feature.  The i386 psABI gives them no DWARF number.
    system: list[_Row] = [
        ("fs_base", "fs_base", 32, "int", None, None),
        ("gs_base", "gs_base", 32, "int", None, None),
    ]
    system += _system_rows(32)
    return {CORE: core, SSE: sse, SEGMENTS: [], SYSTEM: system}


def _system_rows(bits: int) -> list[_Row]:
    """Control, debug and descriptor-table registers.

    CR8 exists only in 64-bit mode; EFER is a 64-bit MSR in both; table limits and
    the LDTR/TR selectors are 32-bit like the segment selectors above.
    """
    crs = ("cr0", "cr2", "cr3", "cr4") + (("cr8",) if bits == 64 else ())
    cr_type = {"cr0": "x86_cr0", "cr2": "data_ptr", "cr4": "x86_cr4"}
    rows: list[_Row] = [(n, n, bits, cr_type.get(n, "int"), None, None) for n in crs]
    rows += [("efer", "efer", 64, "x86_efer", None, None)]
    rows += [(f"dr{i}", f"dr{i}", bits, "data_ptr", None, None) for i in range(4)]
    rows += [("dr6", "dr6", bits, "int", None, None), ("dr7", "dr7", bits, "int", None, None)]
    tr_dwarf = (48, 49) if bits == 32 else (62, 63)
    rows += [
        ("gdtr_base", "gdtr_base", bits, "data_ptr", None, None),
        ("gdtr_limit", "gdtr_limit", 32, "int", None, None),
        ("idtr_base", "idtr_base", bits, "data_ptr", None, None),
        ("idtr_limit", "idtr_limit", 32, "int", None, None),
        ("ldtr", "ldtr", 32, "int32", None, tr_dwarf[1]),
        ("tr", "tr", 32, "int32", None, tr_dwarf[0]),
    ]
    return rows


def _group(feature: str, gdb_type: str) -> str:
    if feature == SSE:
        return "vector"
    if feature == SYSTEM:
        return "system"
    if gdb_type == "i387_ext" or (feature == CORE and gdb_type == "int"):
        return "float"
    return "general"


@functools.cache
def layout(word_size: int, fpu: bool) -> RegisterLayout:
    """The register layout for a guest of ``word_size`` bytes (8: x86-64, 4: i386).

    ``fpu=False`` drops the SSE feature; the x87 registers stay (GDB needs them)
    and are reported unavailable.
    """
    if word_size == 8:
        arch, tables = "i386:x86-64", _rows64()
    elif word_size == 4:
        arch, tables = "i386", _rows32()
    else:
        raise ValueError(f"word size must be 4 or 8, not {word_size}")
    features = (CORE, SSE, SEGMENTS, SYSTEM) if fpu else (CORE, SEGMENTS, SYSTEM)
    regs: list[RegisterDesc] = []
    offset = 0
    for feature in features:
        for name, source, bits, gdb_type, generic, dwarf in tables.get(feature, []):
            regs.append(
                RegisterDesc(
                    name=name,
                    source=source,
                    bitsize=bits,
                    gdb_type=gdb_type,
                    feature=feature,
                    group=_group(feature, gdb_type),
                    regnum=len(regs),
                    offset=offset,
                    generic=generic,
                    dwarf=dwarf,
                    ehframe=dwarf,
                )
            )
            offset += bits // 8
    return RegisterLayout(arch, word_size, fpu, tuple(regs))


# -- g / G / p / P ---------------------------------------------------------------


def reg_hex(desc: RegisterDesc, value: int | None) -> str:
    """Hex text of one register for ``g``/``p`` replies; ``None`` → unavailable ('xx')."""
    if value is None:
        return "xx" * desc.size
    return (value & desc.mask).to_bytes(desc.size, "little").hex()


def parse_reg_hex(desc: RegisterDesc, text: str) -> int:
    """The value in a ``P`` packet (exactly the register's size, little-endian)."""
    if len(text) != 2 * desc.size:
        raise RemoteProtocolError(
            f"register {desc.name} needs {2 * desc.size} hex digits, got {len(text)}"
        )
    try:
        return int.from_bytes(bytes.fromhex(text), "little")
    except ValueError:
        raise RemoteProtocolError(f"bad hex for register {desc.name}: {text!r}") from None


def g_hex(lay: RegisterLayout, values: Mapping[str, int]) -> str:
    """The ``g`` reply for canonical ``values``; registers absent from it read 'xx'.

    Values wider than a register (``rax`` for ``eax``, ``rflags`` for ``eflags``)
    are truncated to the register's size.
    """
    try:
        raw = b"".join(
            (values[name] & mask).to_bytes(size, "little") for name, size, mask in lay.g_plan
        )
    except KeyError:  # some register unavailable: mark it register by register
        return "".join(reg_hex(r, values.get(r.source)) for r in lay.registers)
    return raw.hex()


def encode_g(lay: RegisterLayout, values: Mapping[str, int]) -> bytes:
    """Raw ``g`` bytes; every register must be present (use :func:`g_hex` otherwise)."""
    missing = [r.source for r in lay.registers if r.source not in values]
    if missing:
        raise ValueError(f"no value for {', '.join(missing)}")
    return b"".join((values[r.source] & r.mask).to_bytes(r.size, "little") for r in lay.registers)


def decode_g(lay: RegisterLayout, hexdata: str) -> dict[str, int]:
    """Canonical values from a ``G`` packet's data.

    A short packet sets the registers it covers completely (GDB manual: the
    remaining registers are left alone); a register sent as 'xx' is skipped.
    Values are zero-extended: writing a 32-bit guest's ``eax`` clears the upper
    half of ``rax``, which such a guest cannot see anyway.
    """
    if len(hexdata) % 2:
        raise RemoteProtocolError("G packet has an odd number of hex digits")
    if len(hexdata) > 2 * lay.g_size:
        raise RemoteProtocolError(f"G packet longer than the {lay.g_size}-byte register file")
    out: dict[str, int] = {}
    for r in lay.registers:
        start, end = 2 * r.offset, 2 * (r.offset + r.size)
        if end > len(hexdata):
            break
        chunk = hexdata[start:end]
        if "x" in chunk.lower():
            continue
        out[r.source] = parse_reg_hex(r, chunk)
    return out


# -- target.xml (GDB manual, "Target Descriptions") --------------------------------

# Flag types: name → {bit: field name}, from Intel SDM vol. 1 §3.4.3 (EFLAGS),
# §10.2.3 (MXCSR) and vol. 3 §2.5 (CR0, CR4) and §2.2.1 (EFER).
_FLAGS: dict[str, dict[int, str]] = {
    "i386_eflags": {
        0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF", 11: "OF",
        14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID",
    },
    "i386_mxcsr": {
        0: "IE", 1: "DE", 2: "ZE", 3: "OE", 4: "UE", 5: "PE", 6: "DAZ", 7: "IM",
        8: "DM", 9: "ZM", 10: "OM", 11: "UM", 12: "PM", 15: "FZ",
    },
    "x86_cr0": {
        0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
        29: "NW", 30: "CD", 31: "PG",
    },
    "x86_cr4": {
        0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
        8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
        14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 20: "SMEP", 21: "SMAP",
        22: "PKE", 23: "CET", 24: "PKS",
    },
    "x86_efer": {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 14: "FFXSR"},
}  # fmt: skip
# Multi-bit fields (IOPL, MXCSR.RC) as (name, first bit, last bit).
_FLAG_RANGES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "i386_eflags": (("IOPL", 12, 13),),
    "i386_mxcsr": (("RC", 13, 14),),
}

_VECTORS = (
    ("v4f", "ieee_single", 4, "v4_float"),
    ("v2d", "ieee_double", 2, "v2_double"),
    ("v16i8", "int8", 16, "v16_int8"),
    ("v8i16", "int16", 8, "v8_int16"),
    ("v4i32", "int32", 4, "v4_int32"),
    ("v2i64", "int64", 2, "v2_int64"),
)


def _add_flags(feature: ET.Element, type_id: str, size: int) -> None:
    flags = ET.SubElement(feature, "flags", id=type_id, size=str(size))
    fields = [(name, bit, bit, "bool") for bit, name in _FLAGS[type_id].items()]
    fields += [(name, lo, hi, "uint32") for name, lo, hi in _FLAG_RANGES.get(type_id, ())]
    for name, lo, hi, field_type in sorted(fields, key=lambda f: f[1]):
        ET.SubElement(flags, "field", name=name, start=str(lo), end=str(hi), type=field_type)


def _add_types(feature: ET.Element, regs: list[RegisterDesc]) -> None:
    """Declare, inside ``feature`` (types are feature-scoped), the types its registers use."""
    used = {r.gdb_type: r.size for r in regs}
    if "vec128" in used:
        for vid, elem, count, _ in _VECTORS:
            ET.SubElement(feature, "vector", id=vid, type=elem, count=str(count))
        union = ET.SubElement(feature, "union", id="vec128")
        for vid, _, _, field_name in _VECTORS:
            ET.SubElement(union, "field", name=field_name, type=vid)
        ET.SubElement(union, "field", name="uint128", type="uint128")
    for type_id, size in used.items():
        if type_id in _FLAGS:
            _add_flags(feature, type_id, size)


def _reg_element(feature: ET.Element, r: RegisterDesc) -> None:
    attrs = {
        "name": r.name,
        "bitsize": str(r.bitsize),
        "type": r.gdb_type,
        "regnum": str(r.regnum),
        "group": r.group,
    }
    if r.feature == SYSTEM:
        # An inferior call must not "restore" CR3, EFER or debug registers.
        attrs["save-restore"] = "no"
    # LLDB extensions; GDB ignores attributes it does not know.
    attrs |= {"offset": str(r.offset), "encoding": r.lldb_encoding, "format": r.lldb_format}
    if r.generic is not None:
        attrs["generic"] = r.generic
    if r.dwarf is not None:
        attrs["dwarf_regnum"] = str(r.dwarf)
    if r.ehframe is not None:
        attrs["ehframe_regnum"] = str(r.ehframe)
    ET.SubElement(feature, "reg", attrs)


@functools.cache
def target_xml(lay: RegisterLayout) -> str:
    """The ``target.xml`` document describing ``lay``."""
    root = ET.Element("target", version="1.0")
    ET.SubElement(root, "architecture").text = lay.architecture
    by_feature: dict[str, list[RegisterDesc]] = {}
    for r in lay.registers:
        by_feature.setdefault(r.feature, []).append(r)
    for name, regs in by_feature.items():
        feature = ET.SubElement(root, "feature", name=name)
        _add_types(feature, regs)
        for r in regs:
            _reg_element(feature, r)
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n' + body + "\n"


def xfer_slice(text: str, offset: int, length: int) -> str:
    """A ``qXfer:…:read`` reply: 'm' + chunk if more follows, else 'l' + chunk.

    The caller applies the RSP binary escaping to the chunk.
    """
    if offset < 0 or length < 0:
        raise RemoteProtocolError(f"bad qXfer window {offset:#x},{length:#x}")
    chunk = text[offset : offset + length]
    return ("m" if offset + length < len(text) else "l") + chunk


# -- lldb qRegisterInfo --------------------------------------------------------------

_LLDB_SETS = {
    "general": "General Purpose Registers",
    "float": "Floating Point Registers",
    "vector": "Vector Registers",
    "system": "System Registers",
}


def register_info(lay: RegisterLayout, regnum: int) -> str | None:
    """LLDB's ``qRegisterInfo<regnum>`` reply, or None past the last register
    (the caller then answers ``E45``, which ends LLDB's enumeration)."""
    if not 0 <= regnum < len(lay.registers):
        return None
    r = lay.registers[regnum]
    fields = [
        f"name:{r.name}",
        f"bitsize:{r.bitsize}",
        f"offset:{r.offset}",
        f"encoding:{r.lldb_encoding}",
        f"format:{r.lldb_format}",
        f"set:{_LLDB_SETS[r.group]}",
    ]
    if r.ehframe is not None:
        fields.append(f"gcc:{r.ehframe}")
    if r.dwarf is not None:
        fields.append(f"dwarf:{r.dwarf}")
    if r.generic is not None:
        fields.append(f"generic:{r.generic}")
    return ";".join(fields) + ";"
