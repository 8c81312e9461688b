"""Successor computation for software single-step, on hand-encoded x86 instructions.

Every encoding is checked against capstone's own reading of it (mnemonic and
operands) before its successors are, so a typo in the bytes cannot pass as a
result.  Expected targets are computed here from the encoding's fields.
"""

from __future__ import annotations

import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs
from hypothesis import given
from hypothesis import strategies as st

from xendbg.engine import swstep
from xendbg.errors import GuestMemoryFault, Unsupported

ADDR = 0xFFFFFFFF8010D000
ADDR32 = 0x00100400
M64 = (1 << 64) - 1


class FakeLinearMemory:
    """Test double of guest-linear memory: a dict of byte strings, and a log of reads."""

    def __init__(self) -> None:
        self.data: dict[int, int] = {}
        self.reads: list[tuple[int, int]] = []

    def put(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.data[addr + i] = b

    def put_u64(self, addr: int, value: int) -> None:
        self.put(addr, struct.pack("<Q", value))

    def put_u32(self, addr: int, value: int) -> None:
        self.put(addr, struct.pack("<I", value))

    def read(self, addr: int, size: int) -> bytes:
        self.reads.append((addr, size))
        try:
            return bytes(self.data[addr + i] for i in range(size))
        except KeyError:
            raise GuestMemoryFault(addr) from None


def regs(**values: int) -> dict[str, int]:
    names = [f"r{n}" for n in ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp", "ip", "flags")]
    names += [f"r{i}" for i in range(8, 16)] + ["fs_base", "gs_base"]
    base = dict.fromkeys(names, 0)
    base |= {"cr0": 0x80000011, "efer": 0x500, "cs": 0x08}
    return base | values


def check(code: bytes, text: str, bits: int = 64, addr: int = ADDR) -> None:
    """``code`` is exactly one instruction that capstone prints as ``text``."""
    cs = Cs(CS_ARCH_X86, CS_MODE_64 if bits == 64 else CS_MODE_32)
    insns = list(cs.disasm(code, addr))
    assert len(insns) == 1 and insns[0].size == len(code), insns
    assert f"{insns[0].mnemonic} {insns[0].op_str}".strip() == text


def succ(
    code: bytes,
    text: str,
    r: dict[str, int] | None = None,
    mem: FakeLinearMemory | None = None,
    bits: int = 64,
    addr: int = ADDR,
) -> swstep.Successors:
    check(code, text, bits, addr)
    memory = mem or FakeLinearMemory()
    return swstep.successors(code + b"\x90" * 8, addr, bits, r or regs(rip=addr), memory.read)


def rel8(d: int) -> bytes:
    return struct.pack("<b", d)


def rel32(d: int) -> bytes:
    return struct.pack("<i", d)


# -- straight-line code ---------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "text"),
    [
        (b"\x48\x89\xd8", "mov rax, rbx"),
        (b"\x55", "push rbp"),
        (b"\xf4", "hlt"),
        (b"\xf3\x90", "pause"),  # an F3 prefix that is not rep
        (b"\x0f\x01\xc1", "vmcall"),  # the hypervisor resumes after it
        (b"\xa4", "movsb byte ptr [rdi], byte ptr [rsi]"),  # no rep: one move
        (b"\x48\x0f\xaf\xc0", "imul rax, rax"),
    ],
)
def test_straight_line_continues_after_itself(code: bytes, text: str) -> None:
    s = succ(code, text)
    assert s.length == len(code)
    assert s.targets == {ADDR + len(code)}


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (b"\xf3\xa4", "rep movsb byte ptr [rdi], byte ptr [rsi]"),
        (b"\xf3\x48\xab", "rep stosq qword ptr [rdi], rax"),
        (b"\xf2\xae", "repne scasb al, byte ptr [rdi]"),
    ],
)
def test_rep_string_repeats_itself_or_falls_through(code: bytes, text: str) -> None:
    assert succ(code, text).targets == {ADDR, ADDR + len(code)}


# -- direct branches -------------------------------------------------------------
def test_direct_jmp_and_call_have_one_successor() -> None:
    assert succ(b"\xeb" + rel8(0x10), f"jmp {ADDR + 0x12:#x}").targets == {ADDR + 0x12}
    back = ADDR + 5 - 0x1000
    assert succ(b"\xe9" + rel32(-0x1000), f"jmp {back:#x}").targets == {back}
    # A step of a call ends at the callee, never at the return address.
    callee = ADDR + 5 + 0x2345
    assert succ(b"\xe8" + rel32(0x2345), f"call {callee:#x}").targets == {callee}


def test_jmp_to_itself_is_its_only_successor() -> None:
    assert succ(b"\xeb\xfe", f"jmp {ADDR:#x}").targets == {ADDR}


@pytest.mark.parametrize(
    ("code", "mnemonic"),
    [
        (b"\x74", "je"),
        (b"\x75", "jne"),
        (b"\x7c", "jl"),
        (b"\xe2", "loop"),
        (b"\xe1", "loope"),
        (b"\xe3", "jrcxz"),
        (b"\x67\xe3", "jecxz"),
    ],
)
def test_conditional_short_branches_take_both_ways(code: bytes, mnemonic: str) -> None:
    length = len(code) + 1
    target = ADDR + length - 6
    s = succ(code + rel8(-6), f"{mnemonic} {target:#x}")
    assert s.targets == {target, ADDR + length}


@given(disp=st.integers(-(2**31), 2**31 - 1), cc=st.integers(0, 15))
def test_jcc_rel32_targets(disp: int, cc: int) -> None:
    code = bytes([0x0F, 0x80 | cc]) + rel32(disp)
    s = swstep.successors(code, ADDR, 64, regs(rip=ADDR), FakeLinearMemory().read)
    assert s.length == 6
    assert s.targets == {(ADDR + 6 + disp) & M64, ADDR + 6}


def test_xbegin_may_abort_to_its_fallback() -> None:
    fallback = ADDR + 6 + 0x40
    assert succ(b"\xc7\xf8" + rel32(0x40), f"xbegin {fallback:#x}").targets == {
        fallback,
        ADDR + 6,
    }


def test_32_bit_branch_wraps_at_4_gib() -> None:
    addr = 0xFFFFFFF0
    target = (addr + 5 + 0x100) & 0xFFFFFFFF
    s = succ(b"\xe9" + rel32(0x100), f"jmp {target:#x}", bits=32, addr=addr)
    assert s.targets == {target}


# -- indirect branches -------------------------------------------------------------
def test_indirect_through_registers() -> None:
    r = regs(rip=ADDR, rax=0xFFFFFFFF80123456, r11=0x1000)
    assert succ(b"\xff\xe0", "jmp rax", r).targets == {0xFFFFFFFF80123456}
    assert succ(b"\xff\xd0", "call rax", r).targets == {0xFFFFFFFF80123456}
    assert succ(b"\x41\xff\xe3", "jmp r11", r).targets == {0x1000}


def test_indirect_through_register_in_32_bit_code_uses_the_low_half() -> None:
    r = regs(rip=ADDR32, rax=0xDEAD0000_00101234, efer=0)
    assert succ(b"\xff\xe0", "jmp eax", r, bits=32, addr=ADDR32).targets == {0x101234}


def test_rip_relative_indirect_jump_reads_the_pointer() -> None:
    mem = FakeLinearMemory()
    slot = ADDR + 6 + 0x200  # RIP-relative: from the next instruction
    mem.put_u64(slot, 0xFFFFFFFF80200000)
    s = succ(b"\xff\x25" + rel32(0x200), "jmp qword ptr [rip + 0x200]", mem=mem)
    assert s.targets == {0xFFFFFFFF80200000}
    assert mem.reads == [(slot, 8)]


def test_indirect_call_through_table_with_index_and_scale() -> None:
    # smp.elf's worker: call *spin_table(, %rbx, 8), disp32 sign-extended.
    table = 0x1010A0
    mem = FakeLinearMemory()
    for i in range(4):
        mem.put_u64(table + 8 * i, 0x100200 + 0x10 * i)
    s = succ(
        b"\xff\x14\xdd" + rel32(table),
        f"call qword ptr [rbx*8 + {table:#x}]",
        regs(rip=ADDR, rbx=2),
        mem,
    )
    assert s.targets == {0x100220}


def test_gs_segment_base_is_added() -> None:
    mem = FakeLinearMemory()
    gs_base = 0xFFFF888000010000
    mem.put_u64(gs_base + 0x10, 0xFFFFFFFF81000000)
    s = succ(
        b"\x65\xff\x14\x25\x10\x00\x00\x00",
        "call qword ptr gs:[0x10]",
        regs(rip=ADDR, gs_base=gs_base),
        mem,
    )
    assert s.targets == {0xFFFFFFFF81000000}


def test_32_bit_memory_indirect_reads_four_bytes() -> None:
    mem = FakeLinearMemory()
    mem.put_u32(0x102000 + 3 * 4, 0x100777)
    r = regs(rip=ADDR32, rax=3, efer=0)
    s = succ(
        b"\xff\x24\x85\x00\x20\x10\x00",
        "jmp dword ptr [eax*4 + 0x102000]",
        r,
        mem,
        bits=32,
        addr=ADDR32,
    )
    assert s.targets == {0x100777}
    assert mem.reads == [(0x102000 + 12, 4)]


_BASES = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"]


@given(
    base=st.sampled_from([0, 1, 2, 3, 6, 7]),  # not rsp/rbp: they need other encodings
    index=st.sampled_from([0, 1, 2, 3, 5, 6, 7]),  # not rsp (no index)
    scale=st.integers(0, 3),
    disp=st.integers(-(2**31), 2**31 - 1),
    base_value=st.integers(0, 2**48),
    index_value=st.integers(0, 2**20),
)
def test_modrm_sib_effective_address(
    base: int, index: int, scale: int, disp: int, base_value: int, index_value: int
) -> None:
    # jmp qword ptr [base + index*2^scale + disp32]: FF /4, mod=10, r/m=100 (SIB).
    code = bytes([0xFF, 0b10_100_100, scale << 6 | index << 3 | base]) + rel32(disp)
    values = {_BASES[base]: base_value}
    values[_BASES[index]] = index_value if index != base else base_value
    r = regs(rip=ADDR, **values)
    ea = (r[_BASES[base]] + r[_BASES[index]] * (1 << scale) + disp) & M64
    mem = FakeLinearMemory()
    mem.put_u64(ea, 0x123456789)
    s = swstep.successors(code, ADDR, 64, r, mem.read)
    assert s.targets == {0x123456789}
    assert mem.reads == [(ea, 8)]


# -- returns ---------------------------------------------------------------------------
def test_ret_reads_the_return_address_from_the_stack() -> None:
    mem = FakeLinearMemory()
    rsp = 0xFFFFFFFF80112FF8
    mem.put_u64(rsp, 0xFFFFFFFF8010D00A)
    r = regs(rip=ADDR, rsp=rsp)
    assert succ(b"\xc3", "ret", r, mem).targets == {0xFFFFFFFF8010D00A}
    # ret imm16 pops the imm16 bytes *after* taking the return address.
    assert succ(b"\xc2\x10\x00", "ret 0x10", r, mem).targets == {0xFFFFFFFF8010D00A}


def test_32_bit_ret_reads_four_bytes_at_esp() -> None:
    mem = FakeLinearMemory()
    mem.put_u32(0x104FF0, 0x100130)
    mem.put_u32(0x104FF4, 0xCAFEBABE)  # must not be part of the address
    r = regs(rip=ADDR32, rsp=0x104FF0, efer=0)
    assert succ(b"\xc3", "ret", r, mem, bits=32, addr=ADDR32).targets == {0x100130}


def test_ret_with_unmapped_stack_raises_the_fault() -> None:
    with pytest.raises(GuestMemoryFault):
        succ(b"\xc3", "ret", regs(rip=ADDR, rsp=0x5000))


# -- what a software step refuses to guess ---------------------------------------------
@pytest.mark.parametrize(
    ("code", "text"),
    [
        (b"\xcc", "int3"),
        (b"\xcd\x80", "int 0x80"),
        (b"\x48\xcf", "iretq"),
        (b"\x0f\x05", "syscall"),
        (b"\x48\x0f\x07", "sysretq"),
        (b"\x0f\x34", "sysenter"),
        (b"\x0f\x0b", "ud2"),
        (b"\xcb", "retf"),
        (b"\xff\x2c\x25\x00\x10\x00\x00", "jmp ptr [0x1000]"),  # FF /5: far, m16:64
        (b"\xff\x1c\x25\x00\x10\x00\x00", "call ptr [0x1000]"),  # FF /3: far
    ],
)
def test_unsupported_transfers_raise(code: bytes, text: str) -> None:
    with pytest.raises(Unsupported) as e:
        succ(code, text)
    assert text.split()[0] in str(e.value)


@pytest.mark.parametrize(
    ("code", "text", "bits"),
    [
        (b"\xea\x00\x10\x00\x00\x08\x00", "ljmp 8:0x1000", 32),
        (b"\x9a\x00\x10\x00\x00\x08\x00", "lcall 8, 0x1000", 32),
    ],
)
def test_direct_far_transfers_raise(code: bytes, text: str, bits: int) -> None:
    with pytest.raises(Unsupported, match=r"loads CS|not modelled"):
        succ(code, text, regs(rip=ADDR32, efer=0), bits=bits, addr=ADDR32)


def test_undecodable_bytes_raise() -> None:
    # PUSH ES does not exist in 64-bit mode.
    with pytest.raises(Unsupported, match="no valid 64-bit instruction"):
        swstep.successors(b"\x06", ADDR, 64, regs(rip=ADDR), FakeLinearMemory().read)


# -- code size ----------------------------------------------------------------------------
GDT = 0x7000


def gdt_with(desc: int) -> FakeLinearMemory:
    mem = FakeLinearMemory()
    mem.put_u64(GDT, 0)
    mem.put_u64(GDT + 8, desc)
    return mem


@pytest.mark.parametrize(
    ("efer", "desc", "bits"),
    [
        (0x500, 0x00209A0000000000, 64),  # long mode, CS.L
        (0x500, 0x00CF9A000000FFFF, 32),  # compatibility mode: CS.L clear, CS.D set
        (0x000, 0x00CF9A000000FFFF, 32),  # protected mode
    ],
)
def test_code_bits_from_the_cs_descriptor(efer: int, desc: int, bits: int) -> None:
    r = regs(efer=efer, gdtr_base=GDT, gdtr_limit=23, cs=0x08)
    assert swstep.code_bits(r, 8, gdt_with(desc).read) == bits


def test_code_bits_without_a_readable_gdt_follows_efer_lma() -> None:
    assert swstep.code_bits(regs(efer=0x500, gdtr_base=0xDEAD000, gdtr_limit=23), 8) == 64
    unreadable = FakeLinearMemory().read
    assert swstep.code_bits(regs(efer=0, gdtr_base=0xDEAD000, gdtr_limit=23), 8, unreadable) == 32
    pv = {"rip": 0, "cs": 0xE033}  # a PV context: no CR0, EFER or GDTR
    assert swstep.code_bits(pv, 8) == 64
    assert swstep.code_bits(pv, 4) == 32


def test_real_and_16_bit_code_are_unsupported() -> None:
    with pytest.raises(Unsupported, match="real mode"):
        swstep.code_bits(regs(cr0=0x10), 8)
    r = regs(efer=0, gdtr_base=GDT, gdtr_limit=23, cs=0x08)
    with pytest.raises(Unsupported, match="16-bit"):
        swstep.code_bits(r, 4, gdt_with(0x00009A000000FFFF).read)


def test_register_names_map_to_canonical_registers() -> None:
    r = regs(rax=0x1122334455667788, r9=0xAABBCCDDEEFF0011, rip=0x1000)
    assert swstep.register_value("eax", r) == 0x55667788
    assert swstep.register_value("ax", r) == 0x7788
    assert swstep.register_value("r9d", r) == 0xEEFF0011
    assert swstep.register_value("r9w", r) == 0x0011
    assert swstep.register_value("rip", r) == 0x1000
