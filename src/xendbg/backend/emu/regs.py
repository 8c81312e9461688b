# mypy: disable-error-code="no-untyped-call"
# (Unicorn's Python binding leaves many methods unannotated.)
"""Canonical register names ↔ Unicorn registers, read in one batch.

``get_registers`` is on the hot path of every debugger stop (every single step),
so the whole register file is read with one raw ``uc_reg_read_batch`` into a
buffer prepared once per vCPU and decoded with a few C-level operations (≈10 µs
instead of ≈300 µs one by one); ``read`` of one register skips the binding's wrappers.

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
from unicorn.unicorn_py3.arch.intel import UcIntel
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
# Sizes of the C structures uc_reg_read_batch fills (unicorn/x86.h).
_MSR_SIZE = 16  # uc_x86_msr: u32 rid, u64 value
_MMR_SIZE = 24  # uc_x86_mmr: u16 selector, u64 base, u32 limit, u32 flags
_ST_NAMES = tuple(f"st{i}" for i in range(8))
_XMM_NAMES = tuple(f"xmm{i}" for i in range(16))
_FPU_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop", "mxcsr")


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
        self.absent: tuple[str, ...] = (
            () if wide else (*regnames.GPRS64[8:], "cr8", *(f"xmm{i}" for i in range(8, 16)))
        )
        self.names: tuple[str, ...] = regnames.ALL

        self._plan_batch()
        # Single reads (rip, rflags, CRs... on every stop) skip the binding's generic
        # reg_read: one C call into a slot of their own, whose unused upper bytes
        # stay zero since nothing else writes it.
        self._slots = {name: (rid, ctypes.c_uint64()) for name, rid in simple.items()}
        self._msr_slots = {name: (ctypes.c_uint64 * 2)(msr, 0) for name, msr in _MSRS.items()}

    # -- the batch read --------------------------------------------------------
    # One uc_reg_read_batch fills one flat buffer laid out as the C structures
    # Unicorn writes (u64 slots, uc_x86_msr, uc_x86_mmr, uc_x86_float80, XMM),
    # in canonical order, in three regions: general registers (change at every
    # stop), system registers and x87/SSE state (rarely change).  The last two
    # are decoded into a template dict only when their bytes changed; a result is
    # a copy of the template with the general registers written in.
    # Registers a 32-bit guest lacks get a slot the batch never writes: always 0.

    def _plan_batch(self) -> None:
        names = self.names
        sys_at, fpu_at = names.index("cs"), names.index("st0")
        gpr_names, sys_names = names[:sys_at], names[sys_at:fpu_at]
        self._fpu_names = names[fpu_at:]
        if set(self._fpu_names) != {*_ST_NAMES, *_FPU_CONTROL, *_XMM_NAMES}:
            raise AssertionError("regnames.ALL must end with the x87/SSE registers")
        self._batch_ids: list[int] = []
        self._batch_offsets: list[int] = []
        self._msr_presets: list[tuple[int, int]] = []  # (offset, MSR index)
        self._size = 0
        self._gpr_fmt = self._plan_region(gpr_names)
        self._gpr_names = gpr_names
        self._sys_at = self._size
        self._sys_fmt = self._plan_region(sys_names)
        self._sys_names = sys_names
        self._fpu_at = self._size
        self._fpu_fmt = struct.Struct(self._plan_region(_FPU_CONTROL).format + self._plan_fpu())

        self._buf = (ctypes.c_ubyte * self._size)()
        base = ctypes.addressof(self._buf)
        for offset, msr in self._msr_presets:
            struct.pack_into("<I", self._buf, offset, msr)  # uc_x86_msr.rid: which MSR
        count = len(self._batch_ids)
        self._count = ctypes.c_int(count)
        self._ids = (ctypes.c_int * count)(*self._batch_ids)
        self._ptrs = (ctypes.c_void_p * count)(*(base + o for o in self._batch_offsets))
        self._sys_key = self._fpu_key = self._rest_key = b""
        self._sys: dict[str, int] = {}
        self._fpu: dict[str, int] = {}
        self._template: dict[str, int] = {}

    def _slot(self, size: int, rid: int | None) -> int:
        offset = self._size
        self._size += size
        if rid is not None:
            self._batch_ids.append(rid)
            self._batch_offsets.append(offset)
        return offset

    def _plan_region(self, names: tuple[str, ...]) -> struct.Struct:
        """Slots for ``names``; a struct whose unpack yields their values in order
        (``*_base`` and ``*_limit`` come from one uc_x86_mmr)."""
        fmt = "<"
        for name in names:
            if name in self.absent:
                self._slot(8, None)
                fmt += "Q"
            elif name in self._simple:
                self._slot(8, self._simple[name])
                fmt += "Q"
            elif name in _MSRS:
                offset = self._slot(_MSR_SIZE, x86.UC_X86_REG_MSR)
                self._msr_presets.append((offset, _MSRS[name]))
                fmt += "8xQ"
            elif name.removesuffix("_base") in _MMR:
                self._slot(_MMR_SIZE, _MMR[name.removesuffix("_base")])
                fmt += "8xQI4x"  # base, limit
            elif name in _MMR_SELECTOR:
                self._slot(_MMR_SIZE, _MMR_SELECTOR[name])
                fmt += "H22x"
            elif name.removesuffix("_limit") not in _MMR:
                raise AssertionError(f"no batch slot for register {name}")
        return struct.Struct(fmt)

    def _plan_fpu(self) -> str:
        """Physical FP0-7 and XMM0-15 after the x87/SSE control slots."""
        for i in range(8):
            self._slot(16, x86.UC_X86_REG_FP0 + i)
        for i, name in enumerate(_XMM_NAMES):
            self._slot(16, None if name in self.absent else x86.UC_X86_REG_XMM0 + i)
        return "QH6x" * 8 + "QQ" * 16

    def read_all(self) -> dict[str, int]:
        """Every canonical register, one batch call."""
        status = uclib.uc_reg_read_batch(self._uc._uch, self._ids, self._ptrs, self._count)
        if status:
            raise BackendError("uc_reg_read_batch", detail=str(UcError(status)))
        raw = bytes(self._buf)
        gprs = zip(self._gpr_names, self._gpr_fmt.unpack_from(raw))  # noqa: B905
        if raw[self._sys_at :] != self._rest_key:
            self._rebuild_template(raw)
        # A copy of the template keeps its (canonical) order; only the GPRs change.
        out = self._template.copy()
        out.update(gprs)
        return out

    def _rebuild_template(self, raw: bytes) -> None:
        key = raw[self._sys_at : self._fpu_at]
        if key != self._sys_key:
            self._sys = dict(zip(self._sys_names, self._sys_fmt.unpack(key)))  # noqa: B905
            self._sys_key = key
        key = raw[self._fpu_at :]
        if key != self._fpu_key:
            self._fpu = self._decode_fpu(key)
            self._fpu_key = key
        self._template = dict.fromkeys(self._gpr_names, 0) | self._sys | self._fpu
        self._rest_key = raw[self._sys_at :]

    def _decode_fpu(self, raw: bytes) -> dict[str, int]:
        """x87/SSE registers: ST(i) rotated from the physical FPi by FSW.TOP."""
        v = self._fpu_fmt.unpack(raw)
        n = len(_FPU_CONTROL)
        control = dict(zip(_FPU_CONTROL, v[:n], strict=True))
        fp = v[n:]
        top = (control["fstat"] >> _FP_TOP_SHIFT) & 7
        values = dict(control)
        for i, name in enumerate(_ST_NAMES):
            phys = (top + i) & 7
            values[name] = fp[2 * phys] | fp[2 * phys + 1] << 64
        for i, name in enumerate(_XMM_NAMES):
            values[name] = fp[16 + 2 * i] | fp[17 + 2 * i] << 64
        return {name: values[name] for name in self._fpu_names}

    def read(self, name: str) -> int:
        """One register (cheap path for rip/rflags/control registers and MSRs)."""
        slot = self._slots.get(name)
        if slot is not None:
            rid, value = slot
            self._check(uclib.uc_reg_read(self._uc._uch, rid, ctypes.byref(value)), name)
            return value.value
        msr = self._msr_slots.get(name)  # uc_x86_msr: rid, value
        if msr is not None:
            self._check(uclib.uc_reg_read(self._uc._uch, x86.UC_X86_REG_MSR, msr), name)
            return msr[1]
        return self.read_all()[name]

    @staticmethod
    def _check(status: int, name: str) -> None:
        if status:
            raise BackendError("uc_reg_read", detail=f"{name}: {UcError(status)}")

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
