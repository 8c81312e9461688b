"""vCPU register state: Xen's context structures ↔ canonical register names.

Pure functions over ctypes structures and byte buffers, so every conversion is
tested without a hypervisor:

* HVM/PVH: ``hvm_hw_cpu`` (HVM_SAVE_TYPE(CPU)); writes patch that vCPU's CPU
  record inside the whole save context (``patch_hvm_context``), because
  ``hvm_load`` marks every vCPU without a CPU record as down (seed 000,
  "Register I/O — HVM Read & Write"; xen/arch/x86/hvm/save.c).
* PV: ``vcpu_guest_context_x86_64`` / ``_x86_32``, with the folded CR3
  encoding of 32-bit guests (xen_cr3_to_pfn, arch-x86/xen-x86_32.h).
* FPU: the 512-byte FXSAVE image both contexts carry, with the abridged tag
  byte expanded to the full 16-bit tag word GDB expects (Intel SDM vol. 1,
  §10.5.1, "FXSAVE area": FTW holds one valid bit per physical register).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator, Mapping

from xendbg.arch.x86.regnames import GPRS64
from xendbg.backend.xen import structs
from xendbg.errors import BackendError, XendbgError

CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

XEN_X86_FPU_INITIALISED = 1 << 0
FPU_WORD_SIZE_OFFSET = 511  # Xen records its FXSAVE flavour here (i387.c): 8 = FXSAVE64

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1

# ---------------------------------------------------------------------------
# FXSAVE image (Intel SDM vol. 1, table 10-2)

X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


def _tag_of(reg: int) -> int:
    """Full tag (00 valid, 01 zero, 10 special) of a non-empty 80-bit register."""
    exponent = (reg >> 64) & 0x7FFF
    mantissa = reg & _M64
    if exponent == 0x7FFF:
        return 0b10
    if exponent == 0:
        return 0b01 if mantissa == 0 else 0b10
    return 0b00 if mantissa >> 63 else 0b10  # integer bit clear: unnormal


def full_tag_word(abridged: int, fstat: int, st: list[int]) -> int:
    """The 16-bit FPU tag word from FXSAVE's abridged tag byte.

    Tag bits are per physical register R0-R7; ST(i) is physical (TOP + i) mod 8.
    """
    top = (fstat >> 11) & 7
    word = 0
    for phys in range(8):
        # abridged bit clear: empty (11)
        tag = _tag_of(st[(phys - top) & 7]) if abridged >> phys & 1 else 0b11
        word |= tag << (2 * phys)
    return word


def abridged_tag(full: int) -> int:
    """FXSAVE's tag byte: bit R set unless register R's full tag is 11 (empty)."""
    return sum(1 << r for r in range(8) if (full >> (2 * r)) & 3 != 3)


def fxsave_to_regs(area: bytes, xmm_count: int = 16) -> dict[str, int]:
    fctrl, fstat, ftw, fop = struct.unpack_from("<HHBxH", area, 0)
    wide = area[FPU_WORD_SIZE_OFFSET] == 8
    st = [int.from_bytes(area[32 + 16 * i : 42 + 16 * i], "little") for i in range(8)]
    regs = {f"st{i}": st[i] for i in range(8)}
    regs.update(
        fctrl=fctrl,
        fstat=fstat,
        ftag=full_tag_word(ftw, fstat, st),
        fop=fop & 0x7FF,
        fioff=struct.unpack_from("<I", area, 8)[0],
        fiseg=struct.unpack_from("<I" if wide else "<H", area, 12)[0],
        fooff=struct.unpack_from("<I", area, 16)[0],
        foseg=struct.unpack_from("<I" if wide else "<H", area, 20)[0],
        mxcsr=struct.unpack_from("<I", area, 24)[0],
    )
    for i in range(16):
        regs[f"xmm{i}"] = (
            int.from_bytes(area[160 + 16 * i : 176 + 16 * i], "little") if i < xmm_count else 0
        )
    return regs


FPU_NAMES = frozenset(
    (*(f"st{i}" for i in range(8)), *X87_CONTROL, *(f"xmm{i}" for i in range(16)), "mxcsr")
)


def regs_to_fxsave(area: bytearray | memoryview, values: Mapping[str, int]) -> None:
    """Store the FPU registers of ``values`` into an FXSAVE image in place."""
    wide = area[FPU_WORD_SIZE_OFFSET] == 8
    for name, value in values.items():
        if name.startswith("st"):
            i = int(name[2:])
            area[32 + 16 * i : 42 + 16 * i] = (value & ((1 << 80) - 1)).to_bytes(10, "little")
        elif name.startswith("xmm"):
            i = int(name[3:])
            area[160 + 16 * i : 176 + 16 * i] = (value & ((1 << 128) - 1)).to_bytes(16, "little")
        elif name == "ftag":
            area[4] = abridged_tag(value)
        else:
            fmt, off = {
                "fctrl": ("<H", 0),
                "fstat": ("<H", 2),
                "fop": ("<H", 6),
                "fioff": ("<I", 8),
                "fiseg": ("<I" if wide else "<H", 12),
                "fooff": ("<I", 16),
                "foseg": ("<I" if wide else "<H", 20),
                "mxcsr": ("<I", 24),
            }[name]
            mask = (1 << (8 * struct.calcsize(fmt))) - 1
            if name == "fop":
                mask = 0x7FF
            struct.pack_into(fmt, area, off, value & mask)


# ---------------------------------------------------------------------------
# HVM / PVH: hvm_hw_cpu

# canonical name → hvm_hw_cpu field
HVM_FIELDS: dict[str, str] = {
    **{n: n for n in GPRS64},
    "rip": "rip",
    "rflags": "rflags",
    **{s: f"{s}_sel" for s in ("cs", "ss", "ds", "es", "fs", "gs")},
    "fs_base": "fs_base",
    "gs_base": "gs_base",
    "kernel_gs_base": "shadow_gs",
    "gdtr_base": "gdtr_base",
    "gdtr_limit": "gdtr_limit",
    "idtr_base": "idtr_base",
    "idtr_limit": "idtr_limit",
    "ldtr": "ldtr_sel",
    "tr": "tr_sel",
    "cr0": "cr0",
    "cr2": "cr2",
    "cr3": "cr3",
    "cr4": "cr4",
    "efer": "msr_efer",
    **{f"dr{n}": f"dr{n}" for n in (0, 1, 2, 3, 6, 7)},
}


def hvm_cpu_to_regs(cpu: structs.hvm_hw_cpu) -> dict[str, int]:
    regs = {name: int(getattr(cpu, field)) for name, field in HVM_FIELDS.items()}
    regs.update(fxsave_to_regs(bytes(cpu.fpu_regs)))
    return regs


def check_names(values: Mapping[str, int], known: frozenset[str] | set[str], what: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise XendbgError(f"cannot write {', '.join(unknown)} on {what}")


HVM_WRITABLE = frozenset(HVM_FIELDS) | FPU_NAMES


def apply_hvm_regs(cpu: structs.hvm_hw_cpu, values: Mapping[str, int]) -> None:
    """Write ``values`` into ``cpu``; unknown names raise before anything changes."""
    check_names(values, HVM_WRITABLE, "an HVM vCPU")
    fpu = {}
    for name, value in values.items():
        if name in FPU_NAMES:
            fpu[name] = value
        else:
            field = HVM_FIELDS[name]
            width = getattr(structs.hvm_hw_cpu, field).size
            setattr(cpu, field, value & ((1 << (8 * width)) - 1))
    if fpu:
        area = memoryview(cpu.fpu_regs).cast("B")
        regs_to_fxsave(area, fpu)
        cpu.flags |= XEN_X86_FPU_INITIALISED  # else hvm_load ignores fpu_regs


DESCRIPTOR = struct.Struct("<HHI")  # hvm_save_descriptor


def hvm_records(blob: bytes | bytearray) -> Iterator[tuple[int, int, int, int]]:
    """(typecode, instance, data offset, length) of each record up to END."""
    off = 0
    while off + DESCRIPTOR.size <= len(blob):
        typecode, instance, length = DESCRIPTOR.unpack_from(blob, off)
        off += DESCRIPTOR.size
        if typecode == structs.HVM_SAVE_CODE_END:
            return
        if off + length > len(blob):
            raise BackendError("xc_domain_hvm_getcontext", 0, "truncated HVM context record")
        yield typecode, instance, off, length
        off += length
    raise BackendError("xc_domain_hvm_getcontext", 0, "HVM context has no END record")


def cpu_record_offset(blob: bytes | bytearray, vcpu: int) -> int:
    """Offset of ``vcpu``'s hvm_hw_cpu inside a whole HVM context."""
    for typecode, instance, off, length in hvm_records(blob):
        if typecode == structs.HVM_SAVE_CODE_CPU and instance == vcpu:
            if length < ctypes.sizeof(structs.hvm_hw_cpu):
                raise BackendError(
                    "xc_domain_hvm_getcontext", 0, f"CPU record of {length} bytes is too short"
                )
            return off
    raise BackendError("xc_domain_hvm_getcontext", 0, f"no CPU record for vCPU {vcpu}")


def patch_hvm_context(blob: bytearray, vcpu: int, values: Mapping[str, int]) -> None:
    """Write ``values`` into ``vcpu``'s CPU record of a whole context, in place."""
    off = cpu_record_offset(blob, vcpu)
    cpu = structs.hvm_hw_cpu.from_buffer(blob, off)
    apply_hvm_regs(cpu, values)
    del cpu  # release the buffer export before the caller resizes or sends it


# ---------------------------------------------------------------------------
# PV: vcpu_guest_context


def pv32_cr3_to_pfn(cr3: int) -> int:
    """xen_cr3_to_pfn for 32-bit PV guests: the frame number is folded into 32 bits."""
    return ((cr3 >> 12) | (cr3 << 20)) & _M32


def pv32_pfn_to_cr3(pfn: int) -> int:
    """xen_pfn_to_cr3 for 32-bit PV guests."""
    return ((pfn << 12) | (pfn >> 20)) & _M32


_PV_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
PV64_WRITABLE = (
    frozenset(
        (
            *GPRS64,
            "rip",
            "rflags",
            *_PV_SEGS,
            "fs_base",
            "gs_base",
            "kernel_gs_base",
            "cr2",
            "cr3",
            *(f"dr{n}" for n in (0, 1, 2, 3, 6, 7)),
        )
    )
    | FPU_NAMES
)
_GPRS32 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
_HIGH = frozenset((*(f"r{i}" for i in range(8, 16)), *(f"xmm{i}" for i in range(8, 16))))
PV32_WRITABLE = (PV64_WRITABLE - {"fs_base", "gs_base", "kernel_gs_base"}) - _HIGH


def _pv_control(ctxt_cr: list[int], cr3: int, efer: int) -> dict[str, int]:
    # A PV guest always runs with paging on (PAE for 32-bit ones, 4-level for
    # 64-bit ones): Xen's virtual CR0/CR4 need not say so, the walker must.
    return {
        "cr0": ctxt_cr[0] | CR0_PE | CR0_PG,
        "cr2": ctxt_cr[2],
        "cr3": cr3,
        "cr4": ctxt_cr[4] | CR4_PAE,
        "efer": efer,
    }


def pv64_to_regs(ctx: structs.vcpu_guest_context_x86_64) -> dict[str, int]:
    ur = ctx.user_regs
    regs = {n: int(getattr(ur, n)) for n in (*GPRS64, "rip", "rflags", *_PV_SEGS)}
    in_kernel = bool(ctx.flags & structs.VGCF_IN_KERNEL)
    regs["fs_base"] = int(ctx.fs_base)
    regs["gs_base"] = int(ctx.gs_base_kernel if in_kernel else ctx.gs_base_user)
    regs["kernel_gs_base"] = int(ctx.gs_base_user if in_kernel else ctx.gs_base_kernel)
    crs = [int(c) for c in ctx.ctrlreg]
    regs.update(_pv_control(crs, (crs[3] >> 12) << 12, EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE))
    regs.update({f"dr{n}": int(ctx.debugreg[n]) for n in (0, 1, 2, 3, 6, 7)})
    regs.update(fxsave_to_regs(bytes(ctx.fpu_ctxt)))
    return regs


def pv32_to_regs(ctx: structs.vcpu_guest_context_x86_32) -> dict[str, int]:
    ur = ctx.user_regs
    regs = {n: int(getattr(ur, "e" + n[1:])) for n in _GPRS32}
    regs.update({f"r{i}": 0 for i in range(8, 16)})
    regs["rip"] = int(ur.eip)
    regs["rflags"] = int(ur.eflags)
    regs.update({s: int(getattr(ur, s)) for s in _PV_SEGS})
    crs = [int(c) for c in ctx.ctrlreg]
    regs.update(_pv_control(crs, pv32_cr3_to_pfn(crs[3]) << 12, EFER_NXE))
    regs.update({f"dr{n}": int(ctx.debugreg[n]) for n in (0, 1, 2, 3, 6, 7)})
    regs.update(fxsave_to_regs(bytes(ctx.fpu_ctxt), xmm_count=8))
    return regs


def _split_fpu(values: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    fpu = {k: v for k, v in values.items() if k in FPU_NAMES}
    rest = {k: v for k, v in values.items() if k not in FPU_NAMES}
    return fpu, rest


def apply_pv64(ctx: structs.vcpu_guest_context_x86_64, values: Mapping[str, int]) -> None:
    check_names(values, PV64_WRITABLE, "a 64-bit PV vCPU")
    fpu, rest = _split_fpu(values)
    ur = ctx.user_regs
    in_kernel = bool(ctx.flags & structs.VGCF_IN_KERNEL)
    for name, value in rest.items():
        if name in GPRS64 or name in ("rip", "rflags"):
            setattr(ur, name, value & _M64)
        elif name in _PV_SEGS:
            setattr(ur, name, value & 0xFFFF)
        elif name == "fs_base":
            ctx.fs_base = value & _M64
        elif name in ("gs_base", "kernel_gs_base"):
            kernel_side = (name == "gs_base") == in_kernel
            setattr(ctx, "gs_base_kernel" if kernel_side else "gs_base_user", value & _M64)
        elif name == "cr2":
            ctx.ctrlreg[2] = value & _M64
        elif name == "cr3":
            ctx.ctrlreg[3] = (value >> 12) << 12  # xen_pfn_to_cr3(pfn) = pfn << 12
        else:
            ctx.debugreg[int(name[2:])] = value & _M64
    if fpu:
        regs_to_fxsave(memoryview(ctx.fpu_ctxt).cast("B"), fpu)
        ctx.flags |= structs.VGCF_I387_VALID


def apply_pv32(ctx: structs.vcpu_guest_context_x86_32, values: Mapping[str, int]) -> None:
    # r8-r15 and xmm8-15 do not exist in 32-bit mode: writing them as 0 is a no-op
    # (a 64-bit register file written back whole), anything else an error.
    values = {k: v for k, v in values.items() if not (k in _HIGH and v == 0)}
    check_names(values, PV32_WRITABLE, "a 32-bit PV vCPU")
    fpu, rest = _split_fpu(values)
    ur = ctx.user_regs
    for name, value in rest.items():
        if name in _GPRS32:
            setattr(ur, "e" + name[1:], value & _M32)
        elif name == "rip":
            ur.eip = value & _M32
        elif name == "rflags":
            ur.eflags = value & _M32
        elif name in _PV_SEGS:
            setattr(ur, name, value & 0xFFFF)
        elif name == "cr2":
            ctx.ctrlreg[2] = value & _M32
        elif name == "cr3":
            ctx.ctrlreg[3] = pv32_pfn_to_cr3(value >> 12)
        else:
            ctx.debugreg[int(name[2:])] = value & _M32
    if fpu:
        regs_to_fxsave(memoryview(ctx.fpu_ctxt).cast("B"), fpu)
        ctx.flags |= structs.VGCF_I387_VALID
