"""Cross-check the walker against Unicorn's own MMU (QEMU's x86 page walker).

The same tables live in Unicorn's guest RAM; for each probe address the CPU
executes a load, a store or an instruction fetch there, and the outcome must
match the walker's: a load returns the marker planted at the walker's gpa, a
store lands at that gpa, and a fault is a #PF with CR2 = the address.
Unicorn runs at CPL 0 with CR0.WP=1, so U/S cannot be observed (unit tests
cover it); R/W and XD can.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_CPU_X86_ICELAKE_SERVER,
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_EAX,
    UC_X86_REG_EBX,
    UC_X86_REG_ECX,
    UC_X86_REG_EIP,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RIP,
)

from pagetables import MappingConflict, PageTableBuilder
from xendbg.arch.x86.paging import (
    CR4_LA57,
    EFER_LMA,
    EFER_NXE,
    GIB1,
    KIB4,
    MIB2,
    MIB4,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_XD,
    FaultKind,
    PageFault,
    PagingContext,
    PagingMode,
    Translation,
    walk,
)

MSR_EFER = 0xC000_0080
CODE = 0x1000  # identity-mapped code page
TABLES = 0x10_0000  # page tables: 1 MiB up
GIB4 = 1 << 32
PF = 14  # #PF vector

# Guest RAM per mode and where data pages may point (size → list of (lo, hi)).
# Data never overlaps code or tables, so planting a marker cannot change a walk.
RAM64 = [(0, 2 * GIB1)]
RAM32 = [(0, 64 << 20), (GIB4, 64 << 20)]
DATA = {
    KIB4: [(16 << 20, 64 << 20)],
    MIB2: [(16 << 20, 64 << 20)],
    MIB4: [(16 << 20, 64 << 20), (GIB4, GIB4 + (64 << 20))],
    GIB1: [(GIB1, 2 * GIB1)],
}
WINDOWS = {
    PagingMode.BITS32: (0x0040_0000, 0x8000_0000, 0xC000_0000),
    PagingMode.PAE: (0x0040_0000, 0x8000_0000, 0xC000_0000),
    PagingMode.LEVEL4: (0x4000_0000, 0x7FF0_0000_0000, 0xFFFF_8000_0000_0000),
    PagingMode.LEVEL5: (0x4000_0000, 0x00FF_F000_0000_0000, 0xFF00_0000_0000_0000),
}
SLOTS = {KIB4: 1024, MIB2: 64, MIB4: 32, GIB1: 4}


@dataclass(frozen=True)
class Outcome:
    fault: int | None  # exception vector, None if the instruction completed
    cr2: int = 0
    value: int = 0


class UnicornCpu:
    """One Unicorn x86 CPU whose control registers come from a PageTableBuilder."""

    def __init__(self, mode: PagingMode, *, nxe: bool = True) -> None:
        self.mode = mode
        self.wide = mode.linear_width > 32
        self.word = 8 if self.wide else 4
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64 if self.wide else UC_MODE_32)
        # Icelake-Server advertises NX, 1 GiB pages, PSE-36 and LA57.
        self.uc.ctl_set_cpu_model(UC_CPU_X86_ICELAKE_SERVER)
        for base, size in RAM64 if self.wide else RAM32:
            self.uc.mem_map(base, size)
        self.ax, self.bx, self.ip = (
            (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RIP)
            if self.wide
            else (UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_EIP)
        )
        self.maxphyaddr = self.cpuid(0x8000_0008)[0] & 0xFF
        self.builder = PageTableBuilder(
            mode, read=self.read_phys, write=self.uc.mem_write, table_base=TABLES, nxe=nxe
        )
        self.builder.map(CODE, CODE)
        rex = b"\x48" if self.wide else b""
        self.uc.mem_write(CODE, rex + b"\x8b\x03")  # mov rax, [rbx]
        self.uc.mem_write(CODE + 0x10, rex + b"\x89\x03")  # mov [rbx], rax
        self.vectors: list[int] = []
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self._saved: object = None

    def read_phys(self, gpa: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(gpa, size))

    def _on_interrupt(self, uc: Uc, vector: int, _user: object) -> None:
        self.vectors.append(vector)
        uc.emu_stop()

    def cpuid(self, leaf: int) -> tuple[int, int]:
        """(EAX, ECX) of CPUID ``leaf``; only before ``start_paging``."""
        self.uc.mem_write(CODE + 0x20, b"\x0f\xa2")
        cx = UC_X86_REG_RCX if self.wide else UC_X86_REG_ECX
        self.uc.reg_write(self.ax, leaf)
        self.uc.reg_write(cx, 0)
        self.uc.emu_start(CODE + 0x20, CODE + 0x22, count=1)
        return self.uc.reg_read(self.ax), self.uc.reg_read(cx)

    def start_paging(self) -> PagingContext:
        ctx = self.builder.context
        self.uc.reg_write(UC_X86_REG_CR3, ctx.cr3)
        self.uc.reg_write(UC_X86_REG_CR4, ctx.cr4)
        self.uc.msr_write(MSR_EFER, ctx.efer)
        self.uc.reg_write(UC_X86_REG_CR0, ctx.cr0)
        assert self.uc.reg_read(UC_X86_REG_CR4) == ctx.cr4, "Unicorn refused CR4"
        # Every probe starts from this state: QEMU remembers a pending
        # exception across emu_start calls and would escalate the next #PF to #DF.
        self._saved = self.uc.context_save()
        return ctx

    def _run(self, start: int, length: int, rbx: int, rax: int = 0) -> Outcome:
        self.uc.context_restore(self._saved)
        self.vectors.clear()
        self.uc.reg_write(self.bx, rbx)
        self.uc.reg_write(self.ax, rax)
        # `until` stays inside the instruction's page (see notes/rsp-clients.md).
        self.uc.emu_start(start, start + length, count=1)
        if self.vectors:
            return Outcome(self.vectors[0], self.uc.reg_read(UC_X86_REG_CR2))
        assert self.uc.reg_read(self.ip) == start + length
        return Outcome(None, 0, self.uc.reg_read(self.ax))

    def load(self, linear: int) -> Outcome:
        return self._run(CODE, 3 if self.wide else 2, linear)

    def store(self, linear: int, value: int) -> Outcome:
        return self._run(CODE + 0x10, 3 if self.wide else 2, linear, value)

    def fetch(self, linear: int) -> Outcome:
        """Execute the byte at ``linear``; completes iff RIP moved past a nop there."""
        self.uc.ctl_flush_tb()
        return self._run(linear, 1, 0)


def random_layout(cpu: UnicornCpu, rnd: random.Random, count: int) -> list[tuple[int, int]]:
    """Map up to ``count`` random pages; returns their (linear base, size)."""
    mode, bases = cpu.mode, []
    for _ in range(count):
        size = rnd.choice(mode.page_sizes)
        linear = rnd.choice(WINDOWS[mode]) + rnd.randrange(SLOTS[size]) * size
        lo, hi = rnd.choice(DATA[size])
        gpa = rnd.randrange(lo // size, hi // size) * size
        try:
            cpu.builder.map(
                linear,
                gpa,
                size,
                writable=rnd.random() < 0.7,
                nx=mode.has_nx and rnd.random() < 0.3,
            )
        except MappingConflict:
            continue
        bases.append((linear, size))
    return bases


def probe_addresses(
    cpu: UnicornCpu, rnd: random.Random, bases: list[tuple[int, int]], count: int
) -> list[int]:
    """Word-aligned addresses: inside, next to and far from the mapped pages."""
    out = []
    span = 1 << cpu.mode.linear_width
    for i in range(count):
        if i % 3 == 2:
            linear = rnd.randrange(0, span)
            if cpu.mode.linear_width == 48 and linear >> 47:
                linear |= 0xFFFF_0000_0000_0000
            if cpu.mode.linear_width == 57 and linear >> 56:
                linear |= 0xFE00_0000_0000_0000
        else:
            base, size = rnd.choice(bases)
            linear = max(0, base + rnd.randint(-KIB4, size + KIB4 - 1))
        out.append(linear & ~(cpu.word - 1))
    return out


def walker(cpu: UnicornCpu, ctx: PagingContext, linear: int) -> Translation | PageFault:
    try:
        return walk(cpu.read_phys, ctx, linear, maxphyaddr=cpu.maxphyaddr)
    except PageFault as exc:
        return exc


def assert_load_agrees(cpu: UnicornCpu, ctx: PagingContext, linear: int, marker: int) -> bool:
    """Returns whether the address mapped."""
    t = walker(cpu, ctx, linear)
    if isinstance(t, PageFault):
        out = cpu.load(linear)
        assert (out.fault, out.cr2) == (PF, linear), f"walker: {t}, unicorn: {out}"
        return False
    cpu.uc.mem_write(t.gpa, marker.to_bytes(cpu.word, "little"))
    try:
        out = cpu.load(linear)
    finally:
        cpu.uc.mem_write(t.gpa, bytes(cpu.word))
    assert out == Outcome(None, 0, marker), f"{linear:#x} → {t.gpa:#x}: unicorn {out}"
    return True


MODES = [PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_loads_match_unicorn(mode: PagingMode) -> None:
    rnd = random.Random(f"loads-{mode.value}")
    cpu = UnicornCpu(mode)
    bases = random_layout(cpu, rnd, 48)
    ctx = cpu.start_paging()
    mapped = 0
    for linear in probe_addresses(cpu, rnd, bases, 300):
        mapped += assert_load_agrees(cpu, ctx, linear, rnd.getrandbits(8 * cpu.word) | 1)
    # Both outcomes were exercised, with every page size the mode has.
    assert 60 < mapped < 290
    sizes = {size for _, size in bases}
    assert sizes == set(mode.page_sizes)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_stores_and_fetches_match_unicorn(mode: PagingMode) -> None:
    rnd = random.Random(f"perms-{mode.value}")
    cpu = UnicornCpu(mode)
    bases = random_layout(cpu, rnd, 32)
    ctx = cpu.start_paging()
    seen: set[tuple[bool, bool]] = set()
    for linear in probe_addresses(cpu, rnd, bases, 120):
        t = walker(cpu, ctx, linear)
        marker = rnd.getrandbits(8 * cpu.word) | 1
        store = cpu.store(linear, marker)
        if isinstance(t, PageFault) or not t.writable:  # CR0.WP=1: read-only faults at CPL 0
            assert (store.fault, store.cr2) == (PF, linear)
        else:
            assert store.fault is None
            assert cpu.read_phys(t.gpa, cpu.word) == marker.to_bytes(cpu.word, "little")
            cpu.uc.mem_write(t.gpa, bytes(cpu.word))
        if not isinstance(t, PageFault):
            cpu.uc.mem_write(t.gpa, b"\x90")  # nop
        fetch = cpu.fetch(linear)
        if not isinstance(t, PageFault):
            cpu.uc.mem_write(t.gpa, b"\x00")
            seen.add((t.writable, t.nx))
        if isinstance(t, PageFault) or t.nx:
            assert (fetch.fault, fetch.cr2) == (PF, linear)
        else:
            assert fetch.fault is None
    expected = {(w, x) for w in (False, True) for x in ((False, True) if mode.has_nx else (False,))}
    assert seen == expected


# (mode, page size, level to change, bits to set, bits to clear, EFER.NXE, expected fault)
MUTATIONS = [
    (PagingMode.LEVEL4, KIB4, "PML4E", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.LEVEL4, KIB4, "PDPTE", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.LEVEL4, KIB4, "PDE", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.LEVEL4, KIB4, "PTE", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.LEVEL4, KIB4, "PML4E", PTE_PS, 0, True, FaultKind.RESERVED),
    (PagingMode.LEVEL4, KIB4, "PTE", 1 << 51, 0, True, FaultKind.RESERVED),
    (PagingMode.LEVEL4, KIB4, "PDE", 1 << 45, 0, True, FaultKind.RESERVED),
    (PagingMode.LEVEL4, KIB4, "PTE", PTE_XD, 0, False, FaultKind.RESERVED),
    (PagingMode.LEVEL4, KIB4, "PML4E", PTE_XD, 0, False, FaultKind.RESERVED),
    (PagingMode.LEVEL4, MIB2, "PDE", 1 << 13, 0, True, FaultKind.RESERVED),
    (PagingMode.LEVEL4, GIB1, "PDPTE", 1 << 20, 0, True, FaultKind.RESERVED),
    (PagingMode.LEVEL5, KIB4, "PML5E", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.LEVEL5, KIB4, "PML5E", PTE_PS, 0, True, FaultKind.RESERVED),
    (PagingMode.PAE, KIB4, "PDPTE", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.PAE, KIB4, "PDE", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.PAE, KIB4, "PTE", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.PAE, KIB4, "PTE", 1 << 45, 0, True, FaultKind.RESERVED),
    (PagingMode.PAE, KIB4, "PTE", PTE_XD, 0, False, FaultKind.RESERVED),
    (PagingMode.PAE, MIB2, "PDE", 1 << 13, 0, True, FaultKind.RESERVED),
    (PagingMode.BITS32, KIB4, "PDE32", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.BITS32, KIB4, "PTE32", 0, PTE_P, True, FaultKind.NOT_PRESENT),
    (PagingMode.BITS32, MIB4, "PDE32", 1 << 21, 0, True, FaultKind.RESERVED),
    # Not faults: permissions ANDed and XD ORed from upper levels, ignored bits.
    (PagingMode.LEVEL4, KIB4, "PDPTE", PTE_XD, 0, True, None),
    (PagingMode.LEVEL5, MIB2, "PML5E", PTE_XD, 0, True, None),
    (PagingMode.PAE, KIB4, "PDE", PTE_XD, PTE_RW, True, None),
    (PagingMode.LEVEL4, KIB4, "PDPTE", 0, PTE_RW, True, None),
    (PagingMode.LEVEL4, KIB4, "PDE", 0x7FF0_0000_0000_0000, 0, True, None),
    (PagingMode.BITS32, KIB4, "PDE32", 0, PTE_RW, True, None),
]


@pytest.mark.parametrize(("mode", "size", "level", "set_bits", "clear", "nxe", "expect"), MUTATIONS)
def test_faults_match_unicorn(
    mode: PagingMode,
    size: int,
    level: str,
    set_bits: int,
    clear: int,
    nxe: bool,
    expect: FaultKind | None,
) -> None:
    cpu = UnicornCpu(mode, nxe=nxe)
    linear = WINDOWS[mode][1] & ~(size - 1)
    cpu.builder.map(linear, DATA[size][0][0], size)
    cpu.builder.set_flags(linear, level, set=set_bits, clear=clear)
    ctx = cpu.start_paging()
    t = walker(cpu, ctx, linear + 8)
    if expect is not None:
        assert isinstance(t, PageFault)
        assert (t.level, t.kind) == (level, expect)
    else:
        assert isinstance(t, Translation)
    assert assert_load_agrees(cpu, ctx, linear + 8, 0x5A5A_5A5A) is (expect is None)
    if isinstance(t, Translation):
        assert t.writable is not bool(clear & PTE_RW)
        assert t.nx is bool(set_bits & PTE_XD)
        store = cpu.store(linear + 8, 1)
        assert (store.fault is None) is t.writable
        cpu.uc.mem_write(t.gpa, b"\x90")
        fetch = cpu.fetch(linear + 8)
        assert (fetch.fault is None) is not t.nx


def test_non_canonical_is_not_a_page_fault() -> None:
    cpu = UnicornCpu(PagingMode.LEVEL4)
    ctx = cpu.start_paging()
    for linear in (0x0000_8000_0000_0000, 0xFFFF_0000_0000_1000):
        t = walker(cpu, ctx, linear)
        assert isinstance(t, PageFault) and t.kind is FaultKind.NON_CANONICAL
        out = cpu.load(linear)
        assert out.fault == 13 and out.cr2 == 0  # #GP, no CR2


def test_la57_is_active_in_unicorn() -> None:
    """Guard for the LEVEL5 cross-check: an address only 5-level paging can map."""
    cpu = UnicornCpu(PagingMode.LEVEL5)
    assert cpu.cpuid(7)[1] & (1 << 16), "CPU model lacks LA57"
    cpu.builder.map(0x00AB_CDEF_1234_5000, DATA[KIB4][0][0])
    ctx = cpu.start_paging()
    assert ctx.cr4 & CR4_LA57 and ctx.efer & EFER_NXE
    assert assert_load_agrees(cpu, ctx, 0x00AB_CDEF_1234_5010, 0x1122_3344_5566_7788)


def test_ps_bit_in_cpu_and_walker_agree_on_large_page_base() -> None:
    """A 2 MiB page whose PAT bit (12) is set: the walker must not take it as address."""
    cpu = UnicornCpu(PagingMode.LEVEL4)
    gpa = DATA[MIB2][0][0]
    cpu.builder.map(0x4000_0000, gpa, MIB2)
    cpu.builder.set_flags(0x4000_0000, "PDE", set=1 << 12)
    ctx = cpu.start_paging()
    t = walker(cpu, ctx, 0x4000_0100)
    assert isinstance(t, Translation) and t.gpa == gpa + 0x100
    assert t.entry & PTE_PS
    assert assert_load_agrees(cpu, ctx, 0x4000_0100, 0xCAFE)


def test_flat_long_mode_matches_unicorn() -> None:
    """A fresh UC_MODE_64 CPU (CR0.PG=0, EFER.LMA=1) runs with 64-bit identity mapping."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(CODE, KIB4)
    uc.mem_map(0x5_0000_0000, KIB4)
    uc.mem_write(CODE, b"\x48\x8b\x03")  # mov rax, [rbx]
    ctx = PagingContext(
        uc.reg_read(UC_X86_REG_CR0),
        uc.reg_read(UC_X86_REG_CR3),
        uc.reg_read(UC_X86_REG_CR4),
        uc.msr_read(MSR_EFER),
    )
    assert ctx.mode is PagingMode.NONE and ctx.efer & EFER_LMA
    t = walk(lambda gpa, n: bytes(uc.mem_read(gpa, n)), ctx, 0x5_0000_0010)
    uc.mem_write(t.gpa, (0x0123_4567_89AB_CDEF).to_bytes(8, "little"))
    uc.reg_write(UC_X86_REG_RBX, 0x5_0000_0010)
    uc.emu_start(CODE, CODE + 3, count=1)
    assert uc.reg_read(UC_X86_REG_RAX) == 0x0123_4567_89AB_CDEF
