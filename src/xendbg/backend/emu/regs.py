# mypy: disable-error-code="no-untyped-call"
# (Unicorn's Python binding leaves many methods unannotated.)
"""Canonical register names ↔ Unicorn registers, read in one batch.

``get_registers`` is on the hot path of every debugger stop, so the whole
register file is read with a single raw ``uc_reg_read_batch`` into ctypes
buffers prepared once per vCPU (≈20 µs instead of ≈300 µs one by one).

32-bit guests use the same names: ``rax`` is EAX zero-extended, ``rip`` is EIP;
``r8``-``r15`` and ``xmm8``-``xmm15`` do not exist there and read as 0 (writing
them a non-zero value is an error).  ``st0``-``st7`` are the x87 *stack*
registers ST(i) as in FXSAVE, rotated from Unicorn's physical FP0-FP7 by
FSW.TOP; values are 80-bit ints (significand | exponent << 64).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping

from unicorn import x86_const as x86
from unicorn.unicorn_py3.arch.intel import UcIntel, UcRegMMR, UcRegMSR
from unicorn.unicorn_py3.unicorn import UcError, uclib

from xendbg.arch.x86 import regnames
from xendbg.errors import BackendError, XendbgError

MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_EFER = 0xC0000080

_MSRS = {
    "fs_base": MSR_FS_BASE,
    "gs_base": MSR_GS_BASE,
    "kernel_gs_base": MSR_KERNEL_GS_BASE,
    "efer": MSR_EFER,
}
_SIMPLE_COMMON = {
    "cs": x86.UC_X86_REG_CS,
    "ss": x86.UC_X86_REG_SS,
    "ds": x86.UC_X86_REG_DS,
    "es": x86.UC_X86_REG_ES,
    "fs": x86.UC_X86_REG_FS,
    "gs": x86.UC_X86_REG_GS,
    "cr0": x86.UC_X86_REG_CR0,
    "cr2": x86.UC_X86_REG_CR2,
    "cr3": x86.UC_X86_REG_CR3,
    "cr4": x86.UC_X86_REG_CR4,
    "cr8": x86.UC_X86_REG_CR8,
    "dr0": x86.UC_X86_REG_DR0,
    "dr1": x86.UC_X86_REG_DR1,
    "dr2": x86.UC_X86_REG_DR2,
    "dr3": x86.UC_X86_REG_DR3,
    "dr6": x86.UC_X86_REG_DR6,
    "dr7": x86.UC_X86_REG_DR7,
    "fctrl": x86.UC_X86_REG_FPCW,
    "fstat": x86.UC_X86_REG_FPSW,
    "ftag": x86.UC_X86_REG_FPTAG,
    "fiseg": x86.UC_X86_REG_FCS,
    "fioff": x86.UC_X86_REG_FIP,
    "foseg": x86.UC_X86_REG_FDS,
    "fooff": x86.UC_X86_REG_FDP,
    "fop": x86.UC_X86_REG_FOP,
    "mxcsr": x86.UC_X86_REG_MXCSR,
}
_GPR64 = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in regnames.GPRS64}
_GPR32 = {name: getattr(x86, f"UC_X86_REG_E{name[1:].upper()}") for name in regnames.GPRS64[:8]}
_MMR = {"gdtr": x86.UC_X86_REG_GDTR, "idtr": x86.UC_X86_REG_IDTR}
_MMR_SELECTOR = {"ldtr": x86.UC_X86_REG_LDTR, "tr": x86.UC_X86_REG_TR}

# Write order: mode-defining registers first (EFER before CR4/CR3/CR0, as
# the CPU needs them when CR0.PG changes), FSW before the ST(i) it rotates.
_WRITE_FIRST = ("efer", "cr4", "cr3", "cr0", "fstat")
_FP_TOP_SHIFT = 11
_FP_FMT = struct.Struct("<" + "QH6x" * 8)
_XMM_FMT = struct.Struct("<32Q")
_ST_NAMES = tuple(f"st{i}" for i in range(8))


def _bits(name: str, word_size: int) -> int:
    if name.startswith("st"):
        return 80
    if name.startswith("xmm"):
        return 128
    if name in ("fctrl", "fstat", "ftag", "fiseg", "foseg", "fop", "ldtr", "tr") or name in (
        regnames.SEGMENTS
    ):
        return 16
    if name in ("mxcsr", "gdtr_limit", "idtr_limit"):
        return 32
    if word_size == 4 and (name in _GPR32 or name in ("rip", "rflags")):
        return 32
    return 64


class RegisterFile:
    """Batched access to one Unicorn instance's registers under canonical names."""

    def __init__(self, uc: UcIntel, word_size: int) -> None:
        self._uc = uc
        self.word_size = word_size
        wide = word_size == 8
        gprs = _GPR64 if wide else _GPR32
        simple: dict[str, int] = dict(gprs)
        simple["rip"] = x86.UC_X86_REG_RIP if wide else x86.UC_X86_REG_EIP
        simple["rflags"] = x86.UC_X86_REG_RFLAGS if wide else x86.UC_X86_REG_EFLAGS
        simple.update(_SIMPLE_COMMON)
        if not wide:
            del simple["cr8"]  # the TPR alias exists only in 64-bit mode
        self._simple = simple
        self._xmm_count = 16 if wide else 8
        self.absent: tuple[str, ...] = (
            () if wide else (*regnames.GPRS64[8:], "cr8", *(f"xmm{i}" for i in range(8, 16)))
        )
        self.names: tuple[str, ...] = regnames.ALL

        # The read plan: one batch filling flat buffers, decoded with few Python ops.
        self._simple_names = tuple(simple)
        self._u64 = (ctypes.c_uint64 * len(simple))()
        self._msrs = [UcRegMSR(msr, 0) for msr in _MSRS.values()]
        self._tables = [UcRegMMR() for _ in range(len(_MMR) + len(_MMR_SELECTOR))]
        self._fp = (ctypes.c_ubyte * (16 * 8))()  # 8 x uc_x86_float80, padded to 16
        self._u64_fmt = struct.Struct(f"<{len(simple)}Q")
        self._xmm = (ctypes.c_ubyte * (16 * self._xmm_count))()
        ids = [*simple.values(), *([x86.UC_X86_REG_MSR] * len(_MSRS))]
        ids += [*_MMR.values(), *_MMR_SELECTOR.values()]
        ids += [x86.UC_X86_REG_FP0 + i for i in range(8)]
        ids += [x86.UC_X86_REG_XMM0 + i for i in range(self._xmm_count)]
        u64_base = ctypes.addressof(self._u64)
        xmm_base = ctypes.addressof(self._xmm)
        ptrs = [u64_base + 8 * i for i in range(len(simple))]
        ptrs += [ctypes.addressof(m) for m in self._msrs]
        ptrs += [ctypes.addressof(t) for t in self._tables]
        ptrs += [ctypes.addressof(self._fp) + 16 * i for i in range(8)]
        ptrs += [xmm_base + 16 * i for i in range(self._xmm_count)]
        count = len(ids)
        self._count = ctypes.c_int(count)
        self._ids = (ctypes.c_int * count)(*ids)
        self._ptrs = (ctypes.c_void_p * count)(*ptrs)
        self._xmm_names = tuple(f"xmm{i}" for i in range(self._xmm_count))
        self._msr_names = tuple(_MSRS)

    def read_all(self) -> dict[str, int]:
        """Every canonical register, one batch call."""
        status = uclib.uc_reg_read_batch(self._uc._uch, self._ids, self._ptrs, self._count)
        if status:
            raise BackendError("uc_reg_read_batch", detail=str(UcError(status)))
        # bytes() + struct is far cheaper than iterating ctypes objects.
        out = dict(zip(self._simple_names, self._u64_fmt.unpack(bytes(self._u64)), strict=True))
        for name, msr in zip(self._msr_names, self._msrs, strict=True):
            out[name] = msr.val
        gdtr, idtr, ldtr, tr = self._tables
        out["gdtr_base"], out["gdtr_limit"] = gdtr.base, gdtr.limit
        out["idtr_base"], out["idtr_limit"] = idtr.base, idtr.limit
        out["ldtr"], out["tr"] = ldtr.selector, tr.selector
        fp = _FP_FMT.unpack(bytes(self._fp))
        top = (out["fstat"] >> _FP_TOP_SHIFT) & 7
        for i, name in enumerate(_ST_NAMES):
            phys = (top + i) & 7
            out[name] = fp[2 * phys] | (fp[2 * phys + 1] << 64)
        xmm = _XMM_FMT.unpack(bytes(self._xmm).ljust(256, b"\0"))
        for i, name in enumerate(self._xmm_names):
            out[name] = xmm[2 * i] | (xmm[2 * i + 1] << 64)
        for name in self.absent:
            out[name] = 0
        return {name: out[name] for name in self.names}

    def read(self, name: str) -> int:
        """One register (cheap path for rip/rflags/control registers)."""
        if name in self._simple:
            value: int = self._uc.reg_read(self._simple[name])
            return value
        if name in _MSRS:
            msr: int = self._uc.msr_read(_MSRS[name])
            return msr
        return self.read_all()[name]

    def mmr(self, name: str) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of "gdtr", "idtr", "ldtr" or "tr"."""
        rid = _MMR[name] if name in _MMR else _MMR_SELECTOR[name]
        value: tuple[int, int, int, int] = self._uc.reg_read(rid)
        return value

    def validate(self, values: Mapping[str, int]) -> None:
        """XendbgError for an unknown name or a value that does not fit; nothing written."""
        for name, value in values.items():
            if name not in self.names:
                raise XendbgError(f"unknown register {name!r}")
            if not isinstance(value, int) or value < 0:
                raise XendbgError(f"register {name}: value must be a non-negative int")
            if value >> _bits(name, self.word_size):
                raise XendbgError(
                    f"register {name}: {value:#x} does not fit in "
                    f"{_bits(name, self.word_size)} bits"
                )
            if name in self.absent and value:
                raise XendbgError(f"register {name} does not exist in a 32-bit guest")

    def write(self, values: Mapping[str, int]) -> None:
        """Write ``values`` (already validated) in a CPU-consistent order."""
        uc = self._uc
        ordered = [n for n in _WRITE_FIRST if n in values]
        ordered += [n for n in values if n not in _WRITE_FIRST]
        batch: list[tuple[int, int]] = []
        tables: dict[str, dict[str, int]] = {}
        for name in ordered:
            value = values[name]
            if name in self.absent:
                continue
            if name in _WRITE_FIRST:
                if name == "efer":
                    uc.msr_write(MSR_EFER, value)
                else:
                    uc.reg_write(self._simple[name], value)
            elif name in self._simple:
                batch.append((self._simple[name], value))
            elif name in _MSRS:
                uc.msr_write(_MSRS[name], value)
            elif name.startswith("st"):
                top = (uc.reg_read(x86.UC_X86_REG_FPSW) >> _FP_TOP_SHIFT) & 7
                phys = (top + int(name[2:])) & 7
                uc.reg_write(x86.UC_X86_REG_FP0 + phys, (value & (2**64 - 1), value >> 64))
            elif name.startswith("xmm"):
                uc.reg_write(x86.UC_X86_REG_XMM0 + int(name[3:]), value)
            elif name in _MMR_SELECTOR:
                rid = _MMR_SELECTOR[name]
                _, base, limit, flags = uc.reg_read(rid)
                uc.reg_write(rid, (value, base, limit, flags))
            else:  # gdtr_base, gdtr_limit, idtr_base, idtr_limit
                table, field = name.split("_")
                tables.setdefault(table, {})[field] = value
        if batch:
            uc.reg_write_batch(batch)
        for table, fields in tables.items():
            rid = _MMR[table]
            sel, base, limit, flags = uc.reg_read(rid)
            uc.reg_write(rid, (sel, fields.get("base", base), fields.get("limit", limit), flags))
