"""Register conversions of backend/xen/context.py on ctypes structures and byte buffers."""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xendbg.arch.x86.regnames import BASE, GPRS64, SSE, X87
from xendbg.backend.xen import context, structs
from xendbg.errors import BackendError, XendbgError

CPU_SIZE = ctypes.sizeof(structs.hvm_hw_cpu)

# 80-bit x87 values: 1.0, +0.0, a NaN, a denormal, an unnormal (integer bit clear).
ONE = (0x3FFF << 64) | (1 << 63)
ZERO = 0
NAN = (0x7FFF << 64) | (3 << 62)
DENORMAL = 1
UNNORMAL = 0x3FFF << 64


# -- FXSAVE tag word ------------------------------------------------------------------


def test_full_tag_word_classifies_physical_registers() -> None:
    st_regs = [ONE, ZERO, NAN, DENORMAL, UNNORMAL, ONE, ONE, ONE]
    # TOP = 0: ST(i) is R(i).  R5-R7 are marked empty by the abridged byte.
    word = context.full_tag_word(0b0001_1111, 0, st_regs)
    tags = [(word >> (2 * r)) & 3 for r in range(8)]
    assert tags == [0b00, 0b01, 0b10, 0b10, 0b10, 0b11, 0b11, 0b11]


def test_full_tag_word_follows_top_of_stack() -> None:
    # TOP = 6: ST(0) is R6, ST(1) is R7.  Only R6 and R7 hold values.
    fstat = 6 << 11
    st_regs = [ZERO, ONE] + [NAN] * 6
    word = context.full_tag_word(0b1100_0000, fstat, st_regs)
    assert word == (0b01 << 12) | (0b00 << 14) | 0x0FFF  # R0-R5 empty (11)


@given(abridged=st.integers(0, 255), top=st.integers(0, 7), regs=st.lists(
    st.integers(0, (1 << 80) - 1), min_size=8, max_size=8))  # fmt: skip
def test_abridged_tag_round_trip(abridged: int, top: int, regs: list[int]) -> None:
    full = context.full_tag_word(abridged, top << 11, regs)
    assert context.abridged_tag(full) == abridged
    for r in range(8):  # empty exactly where the abridged bit is clear
        assert ((full >> (2 * r)) & 3 == 3) == (not abridged >> r & 1)


def _fxsave(**kw: int) -> bytearray:
    area = bytearray(512)
    struct.pack_into("<HHBxHIIII", area, 0, kw.get("fcw", 0x37F), kw.get("fsw", 0),
                     kw.get("ftw", 0), kw.get("fop", 0), kw.get("fip", 0), kw.get("fcs", 0),
                     kw.get("fdp", 0), kw.get("fds", 0))  # fmt: skip
    struct.pack_into("<I", area, 24, kw.get("mxcsr", 0x1F80))
    return area


def test_fxsave_fields() -> None:
    area = _fxsave(fcw=0x27F, fsw=7 << 11, ftw=0x80, fop=0xFFFF, fip=0x401000, fcs=0x10,
                   fdp=0x600000, fds=0x18, mxcsr=0x1FA0)  # fmt: skip
    area[32:42] = ONE.to_bytes(10, "little")  # ST(0) = R7
    area[160 + 16 * 15 : 176 + 16 * 15] = (1 << 127 | 5).to_bytes(16, "little")
    regs = context.fxsave_to_regs(bytes(area))
    assert set(regs) == set(X87) | set(SSE)
    assert (regs["fctrl"], regs["fstat"], regs["fop"]) == (0x27F, 7 << 11, 0x7FF)
    assert (regs["fioff"], regs["fiseg"], regs["fooff"], regs["foseg"]) == (
        0x401000, 0x10, 0x600000, 0x18)  # fmt: skip
    assert regs["ftag"] == 0x3FFF  # R7 valid, R0-R6 empty
    assert regs["st0"] == ONE and regs["mxcsr"] == 0x1FA0
    assert regs["xmm15"] == 1 << 127 | 5
    assert context.fxsave_to_regs(bytes(area), xmm_count=8)["xmm15"] == 0


def test_fxsave64_selectors_hold_the_high_halves() -> None:
    area = _fxsave()
    struct.pack_into("<QQ", area, 8, 0xFFFF800000401000, 0xFFFF800000600000)
    area[context.FPU_WORD_SIZE_OFFSET] = 8  # Xen saved with FXSAVE64
    regs = context.fxsave_to_regs(bytes(area))
    assert (regs["fioff"], regs["fiseg"]) == (0x00401000, 0xFFFF8000)
    assert (regs["fooff"], regs["foseg"]) == (0x00600000, 0xFFFF8000)


@settings(max_examples=50)
@given(values=st.fixed_dictionaries({
    "fctrl": st.integers(0, 0xFFFF), "fstat": st.integers(0, 0xFFFF),
    "fop": st.integers(0, 0x7FF), "fioff": st.integers(0, 2**32 - 1),
    "fiseg": st.integers(0, 0xFFFF), "fooff": st.integers(0, 2**32 - 1),
    "foseg": st.integers(0, 0xFFFF), "mxcsr": st.integers(0, 2**32 - 1),
    "st3": st.integers(0, 2**80 - 1), "xmm7": st.integers(0, 2**128 - 1),
    "abridged": st.integers(0, 255)}))  # fmt: skip
def test_fxsave_write_read_round_trip(values: dict[str, int]) -> None:
    area = bytearray(512)
    abridged = values.pop("abridged")
    regs_in = dict(values)
    context.regs_to_fxsave(area, regs_in)
    area[4] = abridged
    regs = context.fxsave_to_regs(bytes(area))
    for name, value in regs_in.items():
        assert regs[name] == value, name
    # Writing the full tag word back reproduces the abridged byte.
    context.regs_to_fxsave(area, {"ftag": regs["ftag"]})
    assert area[4] == abridged


# -- HVM: hvm_hw_cpu and the whole save context -------------------------------------


def _cpu(seed: int) -> structs.hvm_hw_cpu:
    cpu = structs.hvm_hw_cpu()
    for i, (name, ctype) in enumerate(structs.hvm_hw_cpu._fields_[1:]):
        setattr(cpu, name, (seed << 32 | i * 0x1111) & ((1 << (8 * ctypes.sizeof(ctype))) - 1))
    return cpu


def test_hvm_registers_come_from_their_fields() -> None:
    cpu = _cpu(1)
    regs = context.hvm_cpu_to_regs(cpu)
    assert set(regs) >= set(BASE) - {"cr8"}
    assert "cr8" not in regs  # not in hvm_hw_cpu (it is the LAPIC TPR)
    assert regs["rip"] == cpu.rip and regs["rsp"] == cpu.rsp and regs["r15"] == cpu.r15
    assert regs["cs"] == cpu.cs_sel and regs["tr"] == cpu.tr_sel and regs["ldtr"] == cpu.ldtr_sel
    assert regs["kernel_gs_base"] == cpu.shadow_gs and regs["efer"] == cpu.msr_efer
    assert regs["gdtr_limit"] == cpu.gdtr_limit and regs["dr7"] == cpu.dr7


def test_apply_hvm_regs_masks_and_refuses_unknown_names() -> None:
    cpu = _cpu(2)
    before = bytes(cpu)
    with pytest.raises(XendbgError, match="cr8"):
        context.apply_hvm_regs(cpu, {"rip": 1, "cr8": 0})
    assert bytes(cpu) == before  # nothing written
    context.apply_hvm_regs(cpu, {"rip": 0x1234, "cs": 0x1_0008, "dr7": 0x401})
    assert (cpu.rip, cpu.cs_sel, cpu.dr7) == (0x1234, 0x1_0008, 0x401)
    cpu.flags = 0
    context.apply_hvm_regs(cpu, {"xmm3": 7, "rax": 5})
    assert cpu.flags & context.XEN_X86_FPU_INITIALISED  # else Xen ignores fpu_regs
    assert context.hvm_cpu_to_regs(cpu)["xmm3"] == 7


def _record(typecode: int, instance: int, data: bytes) -> bytes:
    return struct.pack("<HHI", typecode, instance, len(data)) + data


def _context(*cpus: structs.hvm_hw_cpu) -> bytearray:
    header = struct.pack("<IIQII", structs.HVM_FILE_MAGIC, 1, 0, 0x806F1, 2_000_000)
    blob = _record(structs.HVM_SAVE_CODE_HEADER, 0, header)
    for i, cpu in enumerate(cpus):
        blob += _record(structs.HVM_SAVE_CODE_CPU, i, bytes(cpu))
    blob += _record(4, 0, b"\x01" * 40)  # e.g. the PIC: must survive untouched
    blob += _record(structs.HVM_SAVE_CODE_END, 0, b"")
    return bytearray(blob)


def test_patch_hvm_context_changes_one_vcpu_only() -> None:
    blob = _context(_cpu(1), _cpu(2), _cpu(3))
    original = bytes(blob)
    context.patch_hvm_context(blob, 1, {"rip": 0xDEADBEEF, "rflags": 0x102})
    assert len(blob) == len(original)
    off = context.cpu_record_offset(blob, 1)
    cpu = structs.hvm_hw_cpu.from_buffer_copy(blob, off)
    assert (cpu.rip, cpu.rflags) == (0xDEADBEEF, 0x102)
    changed = [i for i, (a, b) in enumerate(zip(blob, original, strict=True)) if a != b]
    rip = off + structs.hvm_hw_cpu.rip.offset
    rflags = off + structs.hvm_hw_cpu.rflags.offset
    assert set(changed) <= set(range(rip, rip + 8)) | set(range(rflags, rflags + 8))
    assert [r[:2] for r in context.hvm_records(blob)] == [(1, 0), (2, 0), (2, 1), (2, 2), (4, 0)]


def test_hvm_context_errors() -> None:
    blob = _context(_cpu(1))
    with pytest.raises(BackendError, match="no CPU record for vCPU 5"):
        context.patch_hvm_context(blob, 5, {"rip": 0})
    with pytest.raises(BackendError, match="truncated"):
        list(context.hvm_records(blob[:40]))
    with pytest.raises(BackendError, match="no END"):
        list(context.hvm_records(blob[:-8]))
    short = bytearray(_record(2, 0, bytes(1024)) + _record(0, 0, b""))
    with pytest.raises(BackendError, match="too short"):
        context.cpu_record_offset(short, 0)
    assert CPU_SIZE == 1032


# -- PV ---------------------------------------------------------------------------------


def test_pv32_cr3_folding() -> None:
    # xen_pfn_to_cr3 (x86_32): pfn << 12 | pfn >> 20, in 32 bits.
    assert context.pv32_pfn_to_cr3(0x123456) == 0x23456001
    assert context.pv32_cr3_to_pfn(0x23456001) == 0x123456


@given(st.integers(0, 2**32 - 1))
def test_pv32_cr3_round_trip(pfn: int) -> None:
    assert context.pv32_cr3_to_pfn(context.pv32_pfn_to_cr3(pfn)) == pfn


def _pv64(in_kernel: bool) -> structs.vcpu_guest_context_x86_64:
    ctx = structs.vcpu_guest_context_x86_64()
    ctx.flags = structs.VGCF_IN_KERNEL if in_kernel else 0
    for i, name in enumerate(GPRS64):
        setattr(ctx.user_regs, name, 0x100 + i)
    ctx.user_regs.rip = 0xFFFFFFFF81000000
    ctx.user_regs.rflags = 0x246
    ctx.user_regs.cs = 0xE033
    ctx.fs_base, ctx.gs_base_kernel, ctx.gs_base_user = 0xF5, 0xAE, 0x05E
    ctx.ctrlreg[0] = 0x8005003B
    ctx.ctrlreg[3] = 0x1234 << 12
    ctx.ctrlreg[4] = 0x2660
    ctx.debugreg[7] = 0x400
    ctx.fpu_ctxt[0:2] = (0x7F, 0x03)
    return ctx


def test_pv64_registers_and_gs_bases_follow_kernel_mode() -> None:
    regs = context.pv64_to_regs(_pv64(True))
    assert [regs[n] for n in GPRS64] == [0x100 + i for i in range(16)]
    assert (regs["rip"], regs["rflags"], regs["cs"]) == (0xFFFFFFFF81000000, 0x246, 0xE033)
    assert (regs["fs_base"], regs["gs_base"], regs["kernel_gs_base"]) == (0xF5, 0xAE, 0x5E)
    user = context.pv64_to_regs(_pv64(False))
    assert (user["gs_base"], user["kernel_gs_base"]) == (0x5E, 0xAE)
    assert regs["cr3"] == 0x1234000 and regs["dr7"] == 0x400 and regs["fctrl"] == 0x37F
    # Paging as the guest really runs: 4-level, long mode.
    assert regs["cr0"] & context.CR0_PG and regs["cr4"] & context.CR4_PAE
    assert regs["efer"] & context.EFER_LMA


def test_apply_pv64() -> None:
    ctx = _pv64(False)
    context.apply_pv64(ctx, {"rax": 1, "rip": 2, "gs_base": 3, "kernel_gs_base": 4,
                             "dr0": 5, "cr3": 0x77000, "st0": ONE})  # fmt: skip
    assert (ctx.user_regs.rax, ctx.user_regs.rip) == (1, 2)
    assert (ctx.gs_base_user, ctx.gs_base_kernel) == (3, 4)  # user mode: gs is the user base
    assert (ctx.debugreg[0], ctx.ctrlreg[3]) == (5, 0x77000)
    assert ctx.flags & structs.VGCF_I387_VALID
    assert context.pv64_to_regs(ctx)["st0"] == ONE
    with pytest.raises(XendbgError, match="efer"):
        context.apply_pv64(ctx, {"efer": 0})


def test_pv32_registers() -> None:
    ctx = structs.vcpu_guest_context_x86_32()
    ur = ctx.user_regs
    ur.eax, ur.ebx, ur.ecx, ur.edx, ur.esi, ur.edi, ur.ebp, ur.esp = range(1, 9)
    ur.eip, ur.eflags, ur.cs = 0xC0100000, 0x202, 0xE019
    ctx.ctrlreg[3] = context.pv32_pfn_to_cr3(0x123456)
    regs = context.pv32_to_regs(ctx)
    assert [regs[n] for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")] == list(
        range(1, 9)
    )
    assert regs["r8"] == 0 and regs["rip"] == 0xC0100000 and regs["cs"] == 0xE019
    assert regs["cr3"] == 0x123456 << 12  # beyond 4 GiB: why the folding exists
    assert regs["efer"] & context.EFER_LMA == 0 and regs["cr4"] & context.CR4_PAE
    context.apply_pv32(ctx, {"rax": 0x1_0000_0005, "r9": 0, "xmm12": 0, "cr3": 0x7654321000})
    assert ur.eax == 5 and context.pv32_to_regs(ctx)["cr3"] == 0x7654321000
    with pytest.raises(XendbgError, match="r9"):
        context.apply_pv32(ctx, {"r9": 1})
    with pytest.raises(XendbgError, match="fs_base"):
        context.apply_pv32(ctx, {"fs_base": 0})
