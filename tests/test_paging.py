"""The page-table walker and its cache against hand-built tables (tests/pagetables.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetables import PAGE, MappingConflict, PageTableBuilder, ReadOnlyPhys, SparseMemory
from xendbg.arch.x86.paging import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    GIB1,
    KIB4,
    MIB2,
    MIB4,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    PTE_XD,
    Access,
    FaultKind,
    Level,
    PageFault,
    PagingContext,
    PagingMode,
    Translation,
    canonicalize,
    is_canonical,
    paging_mode,
    phys_mask,
    walk,
    walk_range,
)
from xendbg.arch.x86.tlb import Mmu, TranslationCache
from xendbg.errors import GuestMemoryFault, XendbgError

PAGED = (PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5)
LEVELS = {
    PagingMode.BITS32: ("PDE32", "PTE32"),
    PagingMode.PAE: ("PDPTE", "PDE", "PTE"),
    PagingMode.LEVEL4: ("PML4E", "PDPTE", "PDE", "PTE"),
    PagingMode.LEVEL5: ("PML5E", "PML4E", "PDPTE", "PDE", "PTE"),
}
# A linear address each mode can reach through every level.
PROBE = {
    PagingMode.BITS32: 0x8123_4000,
    PagingMode.PAE: 0xC123_4000,
    PagingMode.LEVEL4: 0xFFFF_8123_4567_8000,
    PagingMode.LEVEL5: 0xFF12_3456_789A_B000,
}


def build(mode: PagingMode, **kw: object) -> tuple[SparseMemory, PageTableBuilder]:
    mem = SparseMemory()
    return mem, PageTableBuilder.on(mem, mode, **kw)


def do_walk(mem: SparseMemory, ctx: PagingContext, linear: int, **kw: int) -> Translation:
    return walk(mem.read_phys, ctx, linear, **kw)


# -- mode selection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cr0", "cr4", "efer", "mode"),
    [
        (0, 0, 0, PagingMode.NONE),
        (CR0_PE, CR4_PAE | CR4_LA57, EFER_LME, PagingMode.NONE),
        (CR0_PG | CR0_PE, 0, 0, PagingMode.BITS32),
        (CR0_PG | CR0_PE, CR4_PSE, EFER_NXE, PagingMode.BITS32),
        (CR0_PG | CR0_PE, CR4_PAE, 0, PagingMode.PAE),
        # LME set but not yet active (PAE paging while entering long mode)
        (CR0_PG | CR0_PE, CR4_PAE | CR4_LA57, EFER_LME, PagingMode.PAE),
        (CR0_PG | CR0_PE, CR4_PAE, EFER_LME | EFER_LMA, PagingMode.LEVEL4),
        (CR0_PG | CR0_PE, CR4_PAE | CR4_LA57, EFER_LME | EFER_LMA, PagingMode.LEVEL5),
    ],
)
def test_paging_mode(cr0: int, cr4: int, efer: int, mode: PagingMode) -> None:
    assert paging_mode(cr0, cr4, efer) is mode
    assert PagingContext(cr0, 0, cr4, efer).mode is mode


@pytest.mark.parametrize(
    ("cr0", "cr4", "mode"),
    [(0x11, 0x50200, PagingMode.NONE), (CR0_PG, CR4_LA57, PagingMode.BITS32)],
)
def test_impossible_lma_states_resolve_like_qemu(cr0: int, cr4: int, mode: PagingMode) -> None:
    # 0x11/0x50200/LME|LMA is a fresh Unicorn UC_MODE_64 CPU: flat 64-bit.
    assert paging_mode(cr0, cr4, EFER_LME | EFER_LMA) is mode


def test_flat_long_mode_is_64bit_identity() -> None:
    reader = ReadOnlyPhys(SparseMemory().read_phys)
    ctx = PagingContext(0x11, 0, 0x50200, EFER_LME | EFER_LMA)
    assert walk(reader, ctx, 0x5_0000_0010).gpa == 0x5_0000_0010
    assert walk_range(reader, ctx, 0xFFFF_FFFF_FFFF_FFF0, 0x10) == [(0xFFFF_FFFF_FFFF_FFF0, 0x10)]
    assert reader.calls == []
    with pytest.raises(PageFault) as exc:
        walk(reader, ctx, 1 << 64)
    assert exc.value.kind is FaultKind.OUT_OF_RANGE


def test_context_from_registers() -> None:
    regs = {"cr0": CR0_PG, "cr3": 0x5000, "cr4": CR4_PAE, "efer": EFER_LMA, "rip": 1}
    assert PagingContext.from_registers(regs) == PagingContext(CR0_PG, 0x5000, CR4_PAE, EFER_LMA)
    assert PagingContext.from_registers({"cr0": 1, "cr3": 2, "cr4": 3}).efer == 0
    with pytest.raises(XendbgError, match="cr3"):
        PagingContext.from_registers({"cr0": 1, "cr4": 3})


def test_canonical_and_phys_mask() -> None:
    assert is_canonical(0x0000_7FFF_FFFF_FFFF)
    assert is_canonical(0xFFFF_8000_0000_0000)
    assert not is_canonical(0x0000_8000_0000_0000)
    assert not is_canonical(0xFFFF_7FFF_FFFF_FFFF)
    assert is_canonical(0x0000_8000_0000_0000, 57)
    assert is_canonical(0xFF00_0000_0000_0000, 57)
    assert not is_canonical(0x0100_0000_0000_0000, 57)
    assert not is_canonical(0xFE00_0000_0000_0000, 57)
    assert canonicalize(0x8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert canonicalize(0xFFFF_7FFF_FFFF_F000) == 0x7FFF_FFFF_F000
    assert canonicalize(0x0100_0000_0000_0000, 57) == 0xFF00_0000_0000_0000
    assert canonicalize(0x0200_0000_0000_1000, 57) == 0x1000
    assert phys_mask() == (1 << 52) - 1
    assert phys_mask(36) == 0xF_FFFF_FFFF
    with pytest.raises(ValueError):
        phys_mask(60)


# -- no paging ------------------------------------------------------------------------


def test_no_paging_is_identity_and_reads_nothing() -> None:
    reader = ReadOnlyPhys(SparseMemory().read_phys)
    ctx = PagingContext(CR0_PE, 0x1234_5000, CR4_PAE, 0)
    t = walk(reader, ctx, 0xDEAD_BEEF)
    assert (t.gpa, t.level, t.writable, t.user, t.nx) == (
        0xDEAD_BEEF,
        Level.NONE,
        True,
        True,
        False,
    )
    assert walk_range(reader, ctx, 0xFFFF_F000, 0x1000) == [(0xFFFF_F000, 0x1000)]
    assert reader.calls == []
    with pytest.raises(PageFault) as exc:
        walk(reader, ctx, 1 << 32)
    assert exc.value.kind is FaultKind.OUT_OF_RANGE


# -- every mode and page size ---------------------------------------------------------

SIZES = [
    (PagingMode.BITS32, KIB4, 0x1234_5000),
    (PagingMode.BITS32, MIB4, 0xAB_1240_0000),  # PSE-36: above 4 GiB
    (PagingMode.PAE, KIB4, 0xF_1234_5000),
    (PagingMode.PAE, MIB2, 0xF_1220_0000),
    (PagingMode.LEVEL4, KIB4, 0xF_FFFF_1234_5000),
    (PagingMode.LEVEL4, MIB2, 0xF_FFFF_1220_0000),
    (PagingMode.LEVEL4, GIB1, 0xF_FFFF_4000_0000),
    (PagingMode.LEVEL5, KIB4, 0xA_BCDE_1234_5000),
    (PagingMode.LEVEL5, MIB2, 0xA_BCDE_1220_0000),
    (PagingMode.LEVEL5, GIB1, 0xA_BCDE_4000_0000),
]


@pytest.mark.parametrize(("mode", "size", "gpa"), SIZES)
def test_map_each_page_size(mode: PagingMode, size: int, gpa: int) -> None:
    mem, b = build(mode)
    linear = PROBE[mode] & ~(size - 1)
    b.map(linear, gpa, size, writable=False, user=True)
    for off in (0, 8, size // 2 + 0x123, size - 1):
        t = do_walk(mem, b.context, linear + off)
        assert t.gpa == gpa + off
        assert t.page_size == size
        assert t.linear_base == linear
        assert (t.writable, t.user, t.nx) == (False, True, False)
    # The neighbouring page of the same size is unmapped.
    with pytest.raises(PageFault) as exc:
        do_walk(mem, b.context, linear + size)
    assert exc.value.kind is FaultKind.NOT_PRESENT
    assert exc.value.linear == linear + size


def test_pse36_respects_maxphyaddr() -> None:
    mem, b = build(PagingMode.BITS32)
    b.map(0x40_0000, 0xF_0040_0000, MIB4)  # physical bits 35:32 = 0xF
    assert do_walk(mem, b.context, 0x40_0010, maxphyaddr=36).gpa == 0xF_0040_0010
    b.map(0x80_0000, 0x10_0080_0000, MIB4)  # bit 36 lives in PDE bit 17: reserved at M=36
    assert do_walk(mem, b.context, 0x80_0000).gpa == 0x10_0080_0000
    with pytest.raises(PageFault) as exc:
        do_walk(mem, b.context, 0x80_0000, maxphyaddr=36)
    assert (exc.value.level, exc.value.kind) == (Level.PDE32, FaultKind.RESERVED)


def test_32bit_without_pse_ignores_ps() -> None:
    # Tables at 4 MiB: the PDE's table address reads as a 4 MiB frame at 4 MiB.
    mem, b = build(PagingMode.BITS32, pse=False, table_base=MIB4)
    b.map(0x40_1000, 0x7000)
    b.set_flags(0x40_1000, "PDE32", set=PTE_PS)
    t = do_walk(mem, b.context, 0x40_1234)
    assert (t.gpa, t.page_size, t.level) == (0x7234, KIB4, Level.PTE32)
    # Same tables with CR4.PSE: the PDE now maps a 4 MiB page at its own address bits.
    ctx = b.context
    pse_ctx = PagingContext(ctx.cr0, ctx.cr3, ctx.cr4 | CR4_PSE, ctx.efer)
    t = do_walk(mem, pse_ctx, 0x40_1234)
    assert (t.gpa, t.page_size) == (MIB4 | 0x1234, MIB4)


# -- permissions ----------------------------------------------------------------------


def _all_levels() -> list[tuple[PagingMode, str]]:
    return [(m, lvl) for m in PAGED for lvl in LEVELS[m]]


@pytest.mark.parametrize(("mode", "level"), _all_levels())
@pytest.mark.parametrize("bit", [PTE_RW, PTE_US])
def test_rw_us_are_anded_across_levels(mode: PagingMode, level: str, bit: int) -> None:
    mem, b = build(mode)
    b.map(PROBE[mode], 0x9000)
    t = do_walk(mem, b.context, PROBE[mode])
    assert t.writable and t.user
    b.set_flags(PROBE[mode], level, clear=bit)
    t = do_walk(mem, b.context, PROBE[mode])
    if mode is PagingMode.PAE and level == "PDPTE":
        # PAE PDPTE bits 1 and 2 are reserved, not permissions.
        assert t.writable and t.user
        return
    assert t.writable is (bit != PTE_RW)
    assert t.user is (bit != PTE_US)
    assert t.gpa == 0x9000


@pytest.mark.parametrize(("mode", "level"), [(m, lv) for m, lv in _all_levels() if m.has_nx])
def test_xd_is_ored_when_nxe_and_reserved_otherwise(mode: PagingMode, level: str) -> None:
    mem, b = build(mode, nxe=True)
    b.map(PROBE[mode], 0x9000)
    b.set_flags(PROBE[mode], level, set=PTE_XD)
    if level == "PDPTE" and mode is PagingMode.PAE:
        with pytest.raises(PageFault) as exc:  # PAE PDPTEs have no XD bit
            do_walk(mem, b.context, PROBE[mode])
        assert (exc.value.level, exc.value.kind) == (Level.PDPTE, FaultKind.RESERVED)
        return
    assert do_walk(mem, b.context, PROBE[mode]).nx
    ctx = b.context
    no_nxe = PagingContext(ctx.cr0, ctx.cr3, ctx.cr4, ctx.efer & ~EFER_NXE)
    with pytest.raises(PageFault) as exc:
        do_walk(mem, no_nxe, PROBE[mode])
    assert (exc.value.level, exc.value.kind) == (Level(level), FaultKind.RESERVED)


@pytest.mark.parametrize("mode", PAGED)
def test_nx_clear_without_xd(mode: PagingMode) -> None:
    for nxe in (True, False):
        mem, b = build(mode, nxe=nxe)
        b.map(PROBE[mode], 0x9000)
        assert not do_walk(mem, b.context, PROBE[mode]).nx


def test_leaf_nx_flag_from_builder() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x40_0000, 0x20_0000, MIB2, nx=True, writable=False, user=False)
    t = do_walk(mem, b.context, 0x40_0000)
    assert (t.nx, t.writable, t.user) == (True, False, False)


def test_permits_and_check() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x1000, 0x1000, writable=False, user=True, nx=True)
    t = do_walk(mem, b.context, 0x1008)
    assert t.permits(Access.READ) and t.permits(Access.USER)
    assert not t.permits(Access.WRITE)
    assert t.permits(Access.WRITE, wp=False)  # supervisor write with CR0.WP=0
    assert not t.permits(Access.WRITE | Access.USER, wp=False)
    assert not t.permits(Access.EXEC)
    with pytest.raises(PageFault) as exc:
        t.check(Access.WRITE)
    assert (exc.value.kind, exc.value.level, exc.value.linear) == (
        FaultKind.PROTECTION,
        Level.PTE,
        0x1008,
    )
    b.map(0x2000, 0x2000, user=False)
    assert not do_walk(mem, b.context, 0x2000).permits(Access.USER)


# -- faults ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "level"), _all_levels())
def test_not_present_at_every_level(mode: PagingMode, level: str) -> None:
    mem, b = build(mode)
    b.map(PROBE[mode], 0x9000)
    egpa = b.entry_gpa(PROBE[mode], level)
    b.set_flags(PROBE[mode], level, clear=PTE_P)
    with pytest.raises(PageFault) as exc:
        do_walk(mem, b.context, PROBE[mode] + 0x10)
    f = exc.value
    assert isinstance(f, GuestMemoryFault)
    assert (f.linear, f.addr, f.level, f.kind) == (
        PROBE[mode] + 0x10,
        PROBE[mode] + 0x10,
        Level(level),
        FaultKind.NOT_PRESENT,
    )
    assert f.entry_gpa == egpa
    assert f.entry == b.read_entry(egpa)
    assert level in str(f) and f"{PROBE[mode] + 0x10:#x}" in str(f)


@pytest.mark.parametrize(
    ("mode", "level", "bits", "size"),
    [
        (PagingMode.LEVEL4, "PML4E", PTE_PS, KIB4),
        (PagingMode.LEVEL5, "PML5E", PTE_PS, KIB4),
        (PagingMode.LEVEL5, "PML4E", PTE_PS, KIB4),
        (PagingMode.LEVEL4, "PML4E", 1 << 45, KIB4),
        (PagingMode.LEVEL4, "PDPTE", 1 << 51, KIB4),
        (PagingMode.LEVEL4, "PDPTE", 1 << 29, GIB1),  # 1 GiB page bits 29:13
        (PagingMode.LEVEL4, "PDE", 1 << 13, MIB2),  # 2 MiB page bits 20:13
        (PagingMode.LEVEL4, "PDE", 1 << 40, KIB4),
        (PagingMode.LEVEL4, "PTE", 1 << 40, KIB4),
        (PagingMode.LEVEL5, "PTE", 1 << 47, KIB4),
        (PagingMode.PAE, "PDPTE", 1 << 1, KIB4),
        (PagingMode.PAE, "PDPTE", 1 << 5, KIB4),
        (PagingMode.PAE, "PDPTE", 1 << 62, KIB4),
        (PagingMode.PAE, "PDE", 1 << 62, KIB4),  # PAE reserves up to bit 62
        (PagingMode.PAE, "PDE", 1 << 20, MIB2),
        (PagingMode.PAE, "PTE", 1 << 41, KIB4),
        (PagingMode.BITS32, "PDE32", 1 << 21, MIB4),
    ],
)
def test_reserved_bits(mode: PagingMode, level: str, bits: int, size: int) -> None:
    mem, b = build(mode)
    linear = PROBE[mode] & ~(size - 1)
    b.map(linear, 0x4000_0000, size)
    b.set_flags(linear, level, set=bits)
    with pytest.raises(PageFault) as exc:
        do_walk(mem, b.context, linear, maxphyaddr=40)
    assert (exc.value.level, exc.value.kind) == (Level(level), FaultKind.RESERVED)
    assert exc.value.entry is not None and exc.value.entry & bits


@pytest.mark.parametrize("level", ["PML4E", "PDPTE", "PDE", "PTE"])
def test_long_mode_ignores_bits_62_52(level: str) -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x5000, 0x6000)
    b.set_flags(0x5000, level, set=0x7FF0_0000_0000_0000)
    t = do_walk(mem, b.context, 0x5008)
    assert t.gpa == 0x6008  # ignored bits never leak into the address


def test_maxphyaddr_bits_are_address_below_and_reserved_above() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x5000, 0x80_0000_6000)  # bit 39
    assert do_walk(mem, b.context, 0x5000, maxphyaddr=40).gpa == 0x80_0000_6000
    with pytest.raises(PageFault):
        do_walk(mem, b.context, 0x5000, maxphyaddr=39)


@pytest.mark.parametrize(
    ("mode", "linear"),
    [
        (PagingMode.LEVEL4, 0x0000_8000_0000_0000),
        (PagingMode.LEVEL4, 0xFFFF_7FFF_FFFF_F000),
        (PagingMode.LEVEL5, 0x0100_0000_0000_0000),
        (PagingMode.LEVEL5, 0xFEFF_FFFF_FFFF_F000),
    ],
)
def test_non_canonical(mode: PagingMode, linear: int) -> None:
    mem, b = build(mode)
    reader = ReadOnlyPhys(mem.read_phys)
    with pytest.raises(PageFault) as exc:
        walk(reader, b.context, linear)
    assert (exc.value.kind, exc.value.level, exc.value.linear) == (
        FaultKind.NON_CANONICAL,
        None,
        linear,
    )
    assert reader.calls == []


def test_la57_reaches_beyond_48_bits() -> None:
    mem, b = build(PagingMode.LEVEL5)
    b.map(0x0000_8000_0000_0000, 0x7000)  # non-canonical with 4 levels
    assert do_walk(mem, b.context, 0x0000_8000_0000_0008).gpa == 0x7008


@pytest.mark.parametrize("mode", PAGED)
def test_out_of_range(mode: PagingMode) -> None:
    mem, b = build(mode)
    too_big = 1 << 64 if mode.linear_width > 32 else 1 << 32
    with pytest.raises(PageFault) as exc:
        do_walk(mem, b.context, too_big)
    assert exc.value.kind is FaultKind.OUT_OF_RANGE
    with pytest.raises(ValueError):
        do_walk(mem, b.context, -1)


@pytest.mark.parametrize(("mode", "level"), _all_levels())
def test_unreadable_table_names_level(mode: PagingMode, level: str) -> None:
    mem, b = build(mode)
    b.map(PROBE[mode], 0x9000)
    levels = LEVELS[mode]
    i = levels.index(level)
    if i == 0:
        ctx = b.context
        ctx = PagingContext(ctx.cr0, 0x7770_0000, ctx.cr4, ctx.efer)  # CR3 → unbacked
    else:
        # Point the level above at an unbacked table.
        egpa = b.entry_gpa(PROBE[mode], levels[i - 1])
        b.write_entry(egpa, (b.read_entry(egpa) & 0xFFF) | 0x7770_0000)
        ctx = b.context
    with pytest.raises(PageFault) as exc:
        do_walk(mem, ctx, PROBE[mode])
    assert (exc.value.level, exc.value.kind) == (Level(level), FaultKind.UNREADABLE)
    assert exc.value.entry_gpa is not None and exc.value.entry_gpa >> 20 == 0x777
    assert isinstance(exc.value.__cause__, GuestMemoryFault)


def test_pae_pdpt_from_cr3_bits_31_5() -> None:
    mem, b = build(PagingMode.PAE)
    assert b.root & 0xFFF == 0x60
    b.map(0xC000_0000, 0x5000)
    ctx = b.context
    assert do_walk(mem, ctx, 0xC000_0000).gpa == 0x5000
    # With CR3 bits 11:5 dropped the walk reads another (empty) PDPT.
    flat = PagingContext(ctx.cr0, ctx.cr3 & ~0xFFF, ctx.cr4, ctx.efer)
    with pytest.raises(PageFault) as exc:
        do_walk(mem, flat, 0xC000_0000)
    assert exc.value.level is Level.PDPTE


# -- ranges ---------------------------------------------------------------------------


def test_range_mixing_page_sizes() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x20_0000, 0x4000_0000, MIB2)
    b.map(0x40_0000, 0x7000)
    b.map(0x40_1000, 0x3000)
    b.map(0x4000_0000, 0x8000_0000, GIB1)
    ctx = b.context
    chunks = walk_range(mem.read_phys, ctx, 0x3F_FF00, 0x1200)
    assert chunks == [(0x401F_FF00, 0x100), (0x7000, 0x1000), (0x3000, 0x100)]
    # a range entirely inside one large page is one chunk
    assert walk_range(mem.read_phys, ctx, 0x4000_1000, 0x100_0000) == [(0x8000_1000, 0x100_0000)]
    assert walk_range(mem.read_phys, ctx, 0x20_0000, 0) == []
    with pytest.raises(PageFault) as exc:
        walk_range(mem.read_phys, ctx, 0x40_1F00, 0x200)
    assert exc.value.linear == 0x40_2000
    with pytest.raises(ValueError):
        walk_range(mem.read_phys, ctx, 0x40_1F00, -1)


def test_range_32bit_4m_then_4k() -> None:
    mem, b = build(PagingMode.BITS32)
    b.map(0x40_0000, 0x1_0000_0000, MIB4)
    b.map(0x80_0000, 0x1000)
    chunks = walk_range(mem.read_phys, b.context, 0x7F_FFFC, 8)
    assert chunks == [(0x1_003F_FFFC, 4), (0x1000, 4)]


# -- never writes ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", PAGED)
def test_walker_only_reads(mode: PagingMode) -> None:
    mem, b = build(mode)
    for i in range(16):
        b.map(PROBE[mode] + i * PAGE, 0x10_0000 + i * PAGE, writable=bool(i & 1))
    before = mem.snapshot()
    reader = ReadOnlyPhys(mem.read_phys)  # has no write method to call
    assert not hasattr(reader, "write") and not hasattr(reader, "write_phys")
    mmu = Mmu(reader)
    for i in range(16):
        do = walk(reader, b.context, PROBE[mode] + i * PAGE + 4)
        assert do.gpa == 0x10_0000 + i * PAGE + 4
        mmu.translate(b.context, PROBE[mode] + i * PAGE)
    assert mem.snapshot() == before  # no Accessed/Dirty bit was set
    esize = 4 if mode is PagingMode.BITS32 else 8
    assert reader.calls and all(size == esize and gpa % esize == 0 for gpa, size in reader.calls)


# -- cache ----------------------------------------------------------------------------


def test_cache_serves_whole_large_page() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x4000_0000, 0x1_0000_0000, GIB1)
    mmu = Mmu(mem.read_phys)
    assert mmu.translate(b.context, 0x4000_0000).gpa == 0x1_0000_0000
    reads = mem.reads
    for off in (0x10, 0x1234_5678, GIB1 - 1):
        t = mmu.translate(b.context, 0x4000_0000 + off)
        assert (t.gpa, t.linear, t.page_size) == (0x1_0000_0000 + off, 0x4000_0000 + off, GIB1)
    assert mem.reads == reads
    assert mmu.cache.hits == 3 and mmu.cache.misses == 1
    assert len(mmu.cache) == 1


def test_cache_sees_table_changes_only_after_invalidate() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x5000, 0x6000)
    mmu = Mmu(mem.read_phys)
    ctx = b.context
    assert mmu.translate(ctx, 0x5010).gpa == 0x6010
    pte = b.entry_gpa(0x5000, "PTE")
    b.write_entry(pte, 0x9000 | PTE_P | PTE_RW)
    assert mmu.translate(ctx, 0x5010).gpa == 0x6010  # stale, like a TLB
    mmu.invalidate(0xABC000)  # another address space: no effect
    assert mmu.translate(ctx, 0x5010).gpa == 0x6010
    mmu.invalidate(ctx.cr3 | 0x18)  # flag/PCID bits are ignored
    t = mmu.translate(ctx, 0x5010)
    assert (t.gpa, t.user) == (0x9010, False)
    b.write_entry(pte, 0)
    assert mmu.translate(ctx, 0x5010).gpa == 0x9010
    mmu.invalidate()
    with pytest.raises(PageFault):
        mmu.translate(ctx, 0x5010)


def test_cache_invalidate_page() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x5000, 0x6000)
    b.map(0x20_0000, 0x40_0000, MIB2)
    mmu = Mmu(mem.read_phys)
    ctx = b.context
    mmu.translate(ctx, 0x5000)
    mmu.translate(ctx, 0x20_0000)
    b.write_entry(b.entry_gpa(0x5000, "PTE"), 0x7000 | PTE_P)
    b.write_entry(b.entry_gpa(0x20_0000, "PDE"), 0x60_0000 | PTE_P | PTE_PS)
    mmu.invalidate_page(0x2F_0000)  # inside the 2 MiB page only
    assert mmu.translate(ctx, 0x20_0000).gpa == 0x60_0000
    assert mmu.translate(ctx, 0x5000).gpa == 0x6000
    mmu.invalidate_page(0x5FFF)
    assert mmu.translate(ctx, 0x5000).gpa == 0x7000


def test_cache_never_holds_faults() -> None:
    mem, b = build(PagingMode.PAE)
    mmu = Mmu(mem.read_phys)
    with pytest.raises(PageFault):
        mmu.translate(b.context, 0x5000)
    b.map(0x5000, 0x6000)
    assert mmu.translate(b.context, 0x5000).gpa == 0x6000


def test_cache_is_keyed_by_walk_relevant_controls() -> None:
    mem, b = build(PagingMode.LEVEL4, nxe=True)
    b.map(0x5000, 0x6000, nx=True)
    mmu = Mmu(mem.read_phys)
    ctx = b.context
    assert mmu.translate(ctx, 0x5000).nx
    no_nxe = PagingContext(ctx.cr0, ctx.cr3, ctx.cr4, ctx.efer & ~EFER_NXE)
    with pytest.raises(PageFault):  # XD reserved without NXE, despite the cached entry
        mmu.translate(no_nxe, 0x5000)
    # A second address space: its own entries.
    b2 = PageTableBuilder.on(mem, PagingMode.LEVEL4, table_base=0x80_0000)
    b2.map(0x5000, 0xA000)
    assert mmu.translate(b2.context, 0x5000).gpa == 0xA000
    assert mmu.translate(ctx, 0x5000).gpa == 0x6000
    # Bits that do not affect the walk (CR0.WP, CR4.PSE in IA-32e mode) share entries.
    misses = mmu.cache.misses
    ctx_wp = PagingContext(ctx.cr0 & ~CR0_WP, ctx.cr3, ctx.cr4 ^ CR4_PSE, ctx.efer)
    assert mmu.translate(ctx_wp, 0x5000).gpa == 0x6000
    assert mmu.cache.misses == misses


def test_cache_is_bounded_lru() -> None:
    mem, b = build(PagingMode.LEVEL4)
    for i in range(10):
        b.map(0x10_0000 + i * PAGE, 0x50_0000 + i * PAGE)
    mmu = Mmu(mem.read_phys, cache_capacity=4)
    for _ in range(2):
        for i in range(10):
            assert mmu.translate(b.context, 0x10_0000 + i * PAGE).gpa == 0x50_0000 + i * PAGE
            assert len(mmu.cache) <= 4
    mmu.translate(b.context, 0x10_9000)  # most recent: a hit
    assert mmu.cache.hits == 1
    with pytest.raises(ValueError):
        TranslationCache(0)


def test_mmu_accepts_register_mapping_and_reads_linear() -> None:
    mem, b = build(PagingMode.LEVEL4)
    b.map(0x7000, 0x2_0000)
    b.map(0x8000, 0x1_0000)
    mem.back(0x1_0000, PAGE)
    mem.back(0x2_0000, PAGE)
    mem.write(0x2_0FFC, b"abcd")
    mem.write(0x1_0000, b"efgh")
    ctx = b.context
    regs = {"cr0": ctx.cr0, "cr3": ctx.cr3, "cr4": ctx.cr4, "efer": ctx.efer}
    mmu = Mmu(mem.read_phys)
    assert mmu.translate(regs, 0x7FFC).gpa == 0x2_0FFC
    assert mmu.translate_range(regs, 0x7FFC, 8) == [(0x2_0FFC, 4), (0x1_0000, 4)]
    assert mmu.read_linear(regs, 0x7FFC, 8) == b"abcdefgh"
    b.map(0x9000, 0x5_0000)  # mapped but unbacked
    with pytest.raises(GuestMemoryFault) as exc:
        mmu.read_linear(regs, 0x8FF0, 0x20)
    assert not isinstance(exc.value, PageFault) and exc.value.addr == 0x9000
    with pytest.raises(PageFault):
        mmu.read_linear(regs, 0x9FF0, 0x20)


def test_builder_refuses_overlaps() -> None:
    _, b = build(PagingMode.LEVEL4)
    b.map(0x20_0000, 0, MIB2)
    with pytest.raises(MappingConflict):
        b.map(0x20_1000, 0)
    with pytest.raises(MappingConflict):
        b.map(0, 0, GIB1)


# -- properties -----------------------------------------------------------------------

# Windows of linear space per mode: several mappings land in shared tables, and
# the upper canonical half is exercised in the 64-bit modes.
WINDOWS = {
    PagingMode.BITS32: (0, 0x8000_0000, 0xC000_0000),
    PagingMode.PAE: (0, 0x8000_0000, 0xC000_0000),
    PagingMode.LEVEL4: (0, 0x7FF0_0000_0000, 0xFFFF_8000_0000_0000, 0xFFFF_FFF0_0000_0000),
    PagingMode.LEVEL5: (0, 0x00FF_F000_0000_0000, 0xFF00_0000_0000_0000, 0xFFFF_FFF0_0000_0000),
}
SLOTS = {KIB4: 1024, MIB2: 64, MIB4: 32, GIB1: 4}


class Model:
    """The mappings a test asked for: what the walker must report."""

    def __init__(self) -> None:
        self.pages: list[tuple[int, int, int, bool, bool, bool]] = []

    def __repr__(self) -> str:
        return (
            "Model["
            + ", ".join(
                f"{la:#x}+{size:#x}->{gpa:#x} w={w:d} u={u:d} nx={nx:d}"
                for la, size, gpa, w, u, nx in self.pages
            )
            + "]"
        )

    def lookup(self, linear: int) -> tuple[int, int, int, bool, bool, bool] | None:
        for page in self.pages:
            if page[0] <= linear < page[0] + page[1]:
                return page
        return None


@st.composite
def address_spaces(
    draw: st.DrawFn,
) -> tuple[PagingMode, int, SparseMemory, PageTableBuilder, Model]:
    mode = draw(st.sampled_from(PAGED))
    maxphyaddr = draw(st.sampled_from((36, 40, 46, 52)))
    mem, b = build(mode)
    model = Model()
    windows = WINDOWS[mode]
    for _ in range(draw(st.integers(1, 16))):
        size = draw(st.sampled_from(mode.page_sizes))
        where = draw(st.integers(0, len(windows) * SLOTS[size] - 1))
        linear = windows[where % len(windows)] + (where // len(windows)) * size
        # 32-bit PTEs hold 32-bit frames; PSE-36 reaches 40 bits.
        phys_bits = {KIB4: 32, MIB4: 40}.get(size, 52) if mode is PagingMode.BITS32 else 52
        gpa = draw(st.integers(0, (1 << min(maxphyaddr, phys_bits)) // size - 1)) * size
        perms = draw(st.integers(0, 7))
        writable, user = bool(perms & 1), bool(perms & 2)
        nx = mode.has_nx and bool(perms & 4)
        try:
            b.map(linear, gpa, size, writable=writable, user=user, nx=nx)
        except MappingConflict:
            continue
        model.pages.append((linear, size, gpa, writable, user, nx))
    return mode, maxphyaddr, mem, b, model


PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)


@PROPERTY_SETTINGS
@given(space=address_spaces(), rnd=st.randoms(use_true_random=False))
def test_property_mapped_addresses_translate(
    space: tuple[PagingMode, int, SparseMemory, PageTableBuilder, Model], rnd: random.Random
) -> None:
    _, maxphyaddr, mem, b, model = space
    mmu = Mmu(mem.read_phys, maxphyaddr=maxphyaddr)
    for linear, size, gpa, writable, user, nx in model.pages:
        off = rnd.randrange(size)
        for t in (
            walk(mem.read_phys, b.context, linear + off, maxphyaddr=maxphyaddr),
            mmu.translate(b.context, linear + off),
        ):
            assert t.gpa == gpa + off
            assert t.page_size == size
            assert (t.writable, t.user, t.nx) == (writable, user, nx)


@PROPERTY_SETTINGS
@given(space=address_spaces(), rnd=st.randoms(use_true_random=False))
def test_property_random_addresses_match_model(
    space: tuple[PagingMode, int, SparseMemory, PageTableBuilder, Model], rnd: random.Random
) -> None:
    mode, maxphyaddr, mem, b, model = space
    mmu = Mmu(mem.read_phys, maxphyaddr=maxphyaddr)
    span = 4 * GIB1 if mode.linear_width > 32 else 0x3FFF_FFFF
    for i in range(20):
        if i % 2:
            linear = rnd.choice(WINDOWS[mode]) + rnd.randint(0, span)
        else:  # next to a mapping: faults come from the lower levels
            near, size = rnd.choice(model.pages)[:2]
            linear = max(0, near + rnd.randint(-size, 2 * size))
        expected = model.lookup(linear)
        for translate in (
            lambda la: walk(mem.read_phys, b.context, la, maxphyaddr=maxphyaddr),
            lambda la: mmu.translate(b.context, la),
        ):
            if expected is None:
                with pytest.raises(PageFault) as exc:
                    translate(linear)
                canonical = mode.linear_width == 32 or is_canonical(linear, mode.linear_width)
                assert exc.value.kind is (
                    FaultKind.NOT_PRESENT if canonical else FaultKind.NON_CANONICAL
                )
                assert exc.value.linear == linear
            else:
                assert translate(linear).gpa == expected[2] + linear - expected[0]


@PROPERTY_SETTINGS
@given(space=address_spaces(), data=st.data())
def test_property_ranges(
    space: tuple[PagingMode, int, SparseMemory, PageTableBuilder, Model], data: st.DataObject
) -> None:
    _, maxphyaddr, mem, b, model = space
    mmu = Mmu(mem.read_phys, maxphyaddr=maxphyaddr)
    linear0, size0 = data.draw(st.sampled_from([(p[0], p[1]) for p in model.pages]))
    # Start inside a mapping, often close to its end, and run into what follows.
    start = linear0 + size0 - data.draw(st.integers(1, size0))
    size = data.draw(st.integers(0, 3 * MIB2))
    # Where the model says the range first leaves mapped memory, if it does.
    first_hole = None
    la = start
    while la < start + size:
        page = model.lookup(la)
        if page is None:
            first_hole = la
            break
        la = page[0] + page[1]
    if first_hole is not None:
        with pytest.raises(PageFault) as exc:
            mmu.translate_range(b.context, start, size)
        assert exc.value.linear == first_hole
        return
    chunks = mmu.translate_range(b.context, start, size)
    assert chunks == walk_range(mem.read_phys, b.context, start, size, maxphyaddr=maxphyaddr)
    assert sum(n for _, n in chunks) == size
    la = start
    for gpa, n in chunks:
        page = model.lookup(la)
        assert page is not None
        assert gpa == page[2] + la - page[0]
        assert 0 < n <= page[0] + page[1] - la  # never crosses a page boundary
        la += n
        assert la == start + size or la == page[0] + page[1]  # split only at page ends
    assert la == start + size
