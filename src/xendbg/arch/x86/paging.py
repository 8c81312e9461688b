"""x86 linear → guest-physical translation (Intel SDM vol. 3A, chapter 4).

Theory of operation: ``walk`` reads paging-structure entries through a
``read_phys(gpa, size) -> bytes`` callable and never writes: a debugger must not
set Accessed/Dirty bits the guest did not set itself.  The paging mode comes
from CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57 (SDM table 4-1).  Each level's
entry is checked for P and for reserved bits; R/W and U/S are ANDed across the
levels and XD is ORed (only when EFER.NXE, since XD is reserved otherwise).
The result is the mapping and its permissions; what an access may do with it
is the caller's policy (``Translation.permits`` is a helper for that).

Caching lives in ``tlb.py``; this module is stateless.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from xendbg.errors import GuestMemoryFault, XendbgError

ReadPhys = Callable[[int, int], bytes]

# Control-register bits (SDM vol. 3A 2.5 and 2.2.1).
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# Paging-structure entry bits.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7
PTE_XD = 1 << 63

KIB4 = 1 << 12
MIB2 = 1 << 21
MIB4 = 1 << 22
GIB1 = 1 << 30

DEFAULT_MAXPHYADDR = 52
_ADDR_LIMIT_64 = 1 << 64
_ADDR_LIMIT_32 = 1 << 32


class PagingMode(enum.Enum):
    """The five translation regimes of SDM table 4-1."""

    NONE = "none"  # CR0.PG=0: linear = physical
    BITS32 = "32-bit"
    PAE = "PAE"
    LEVEL4 = "4-level"
    LEVEL5 = "5-level"

    @property
    def linear_width(self) -> int:
        """Bits of linear address this mode translates."""
        return {PagingMode.LEVEL4: 48, PagingMode.LEVEL5: 57}.get(self, 32)

    @property
    def page_sizes(self) -> tuple[int, ...]:
        """Page sizes this mode can map, smallest first (NONE maps none)."""
        return _PAGE_SIZES[self]

    @property
    def has_nx(self) -> bool:
        """Whether entries carry an XD bit at all (32-bit entries have none)."""
        return self in (PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5)


_PAGE_SIZES: dict[PagingMode, tuple[int, ...]] = {
    PagingMode.NONE: (),
    PagingMode.BITS32: (KIB4, MIB4),
    PagingMode.PAE: (KIB4, MIB2),
    PagingMode.LEVEL4: (KIB4, MIB2, GIB1),
    PagingMode.LEVEL5: (KIB4, MIB2, GIB1),
}


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """Pick the paging mode from the control registers (SDM table 4-1).

    EFER.LMA, not LME, decides: LMA is what the CPU set when it activated
    IA-32e mode.  States hardware cannot reach (LMA=1 with CR0.PG=0 or
    CR4.PAE=0) resolve as QEMU/Unicorn resolve them, PG first, then PAE:
    a Unicorn UC_MODE_64 CPU starts with PG=0 and LMA=1 and runs flat.
    """
    if not cr0 & CR0_PG:
        return PagingMode.NONE
    if not cr4 & CR4_PAE:
        return PagingMode.BITS32
    if not efer & EFER_LMA:
        return PagingMode.PAE
    return PagingMode.LEVEL5 if cr4 & CR4_LA57 else PagingMode.LEVEL4


def phys_mask(maxphyaddr: int = DEFAULT_MAXPHYADDR) -> int:
    """Mask of the physical-address bits a CPU with this MAXPHYADDR implements."""
    _check_maxphyaddr(maxphyaddr)
    return (1 << maxphyaddr) - 1


def is_canonical(linear: int, width: int = 48) -> bool:
    """True when bits 63:width-1 of ``linear`` are all equal (48, or 57 with LA57)."""
    top = linear >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


def canonicalize(linear: int, width: int = 48) -> int:
    """Sign-extend bit width-1 of ``linear`` into bits 63:width (as a 64-bit value)."""
    linear &= (1 << width) - 1
    if linear >> (width - 1):
        linear |= (_ADDR_LIMIT_64 - 1) & ~((1 << width) - 1)
    return linear


def _check_maxphyaddr(maxphyaddr: int) -> None:
    if not 32 <= maxphyaddr <= 52:
        raise ValueError(f"MAXPHYADDR {maxphyaddr} outside 32..52")


@dataclass(frozen=True, slots=True)
class PagingContext:
    """The control values a walk depends on; any register container converts to this."""

    cr0: int
    cr3: int
    cr4: int
    efer: int = 0
    _mode: PagingMode = field(init=False, repr=False, compare=False)
    _walk_key: tuple[int, ...] = field(init=False, repr=False, compare=False)

    @classmethod
    def from_registers(cls, regs: Mapping[str, int]) -> PagingContext:
        """Read keys "cr0", "cr3", "cr4" and "efer" (absent on CPUs without it: 0)."""
        missing = [name for name in ("cr0", "cr3", "cr4") if name not in regs]
        if missing:
            raise XendbgError(f"register set lacks {', '.join(missing)}")
        return cls(regs["cr0"], regs["cr3"], regs["cr4"], regs.get("efer", 0))

    def __post_init__(self) -> None:
        # Every cached translation is looked up by these: derive them once.
        mode = paging_mode(self.cr0, self.cr4, self.efer)
        pse = bool(self.cr4 & CR4_PSE) and mode is PagingMode.BITS32
        nxe = bool(self.efer & EFER_NXE) and mode.has_nx
        object.__setattr__(self, "_mode", mode)
        object.__setattr__(self, "_walk_key", (self.cr3, _MODE_CODES[mode], int(pse), int(nxe)))

    @property
    def mode(self) -> PagingMode:
        return self._mode

    @property
    def nxe(self) -> bool:
        """XD bits are honoured (EFER.NXE in a mode whose entries have XD)."""
        return bool(self.efer & EFER_NXE) and self.mode.has_nx

    @property
    def walk_key(self) -> tuple[int, ...]:
        """The values that decide every walk result for a given memory content:
        CR3, the mode, CR4.PSE where the mode reads it, and NXE where it applies."""
        return self._walk_key


_MODE_CODES = {mode: i for i, mode in enumerate(PagingMode)}


class Level(enum.StrEnum):
    """Paging-structure levels, named as in the SDM.  32-bit paging's 4-byte
    entries get their own names so a fault says which format was read."""

    NONE = "none"  # no paging structure (CR0.PG=0)
    PML5E = "PML5E"
    PML4E = "PML4E"
    PDPTE = "PDPTE"
    PDE = "PDE"
    PTE = "PTE"
    PDE32 = "PDE32"
    PTE32 = "PTE32"


class FaultKind(enum.StrEnum):
    NOT_PRESENT = "not present"
    RESERVED = "reserved bit set"
    NON_CANONICAL = "non-canonical address"
    OUT_OF_RANGE = "linear address beyond the mode's address space"
    UNREADABLE = "paging structure unreadable"
    PROTECTION = "access not permitted"


class PageFault(GuestMemoryFault):
    """A linear address does not translate.

    ``level`` names the entry that stopped the walk (None when the address was
    rejected before any table was read); ``entry``/``entry_gpa`` give that
    entry's value and location when it was read.
    """

    def __init__(
        self,
        linear: int,
        level: Level | None,
        kind: FaultKind,
        *,
        entry: int | None = None,
        entry_gpa: int | None = None,
        detail: str = "",
    ) -> None:
        self.linear = linear
        self.level = level
        self.kind = kind
        self.entry = entry
        self.entry_gpa = entry_gpa
        reason = f"{level.value} {kind.value}" if level is not None else kind.value
        if entry is not None and entry_gpa is not None:
            reason += f" (entry {entry:#x} at {entry_gpa:#x})"
        elif entry_gpa is not None:
            reason += f" (at {entry_gpa:#x})"
        if detail:
            reason += f": {detail}"
        super().__init__(linear, reason)


class Access(enum.Flag):
    """What an access needs from a page (for ``Translation.permits``)."""

    READ = 0
    WRITE = enum.auto()
    USER = enum.auto()
    EXEC = enum.auto()


@dataclass(frozen=True, slots=True)
class Translation:
    """One linear address's mapping and the effective permissions of its page."""

    linear: int
    gpa: int
    page_size: int
    writable: bool
    user: bool
    nx: bool
    level: Level  # level of the leaf entry that mapped the page
    entry: int = 0  # raw leaf entry (0 without paging)

    @property
    def linear_base(self) -> int:
        return self.linear & ~(self.page_size - 1)

    @property
    def gpa_base(self) -> int:
        return self.gpa & ~(self.page_size - 1)

    @property
    def offset(self) -> int:
        return self.linear & (self.page_size - 1)

    def at(self, linear: int) -> Translation:
        """The same page's translation for another ``linear`` inside it."""
        if linear & ~(self.page_size - 1) != self.linear_base:
            raise ValueError(f"{linear:#x} is outside the page at {self.linear_base:#x}")
        return Translation(
            linear,
            self.gpa_base | (linear & (self.page_size - 1)),
            self.page_size,
            self.writable,
            self.user,
            self.nx,
            self.level,
            self.entry,
        )

    def permits(self, access: Access, *, wp: bool = True) -> bool:
        """Page-level protection (SDM 4.6) for ``access``; ``wp`` is CR0.WP.
        SMEP, SMAP and protection keys are not modelled."""
        if Access.USER in access and not self.user:
            return False
        if Access.WRITE in access and not self.writable and (wp or Access.USER in access):
            return False
        return not (Access.EXEC in access and self.nx)

    def check(self, access: Access, *, wp: bool = True) -> None:
        """Raise PageFault(PROTECTION) unless ``permits(access)``."""
        if not self.permits(access, wp=wp):
            raise PageFault(self.linear, self.level, FaultKind.PROTECTION, detail=str(access))


@dataclass(frozen=True, slots=True)
class _LevelSpec:
    level: Level
    shift: int  # lowest linear-address bit of this level's 9-bit index
    large: bool  # PS=1 maps a page of 1 << shift bytes here


_LONG4 = (
    _LevelSpec(Level.PML4E, 39, False),
    _LevelSpec(Level.PDPTE, 30, True),
    _LevelSpec(Level.PDE, 21, True),
    _LevelSpec(Level.PTE, 12, False),
)
_LONG5 = (_LevelSpec(Level.PML5E, 48, False), *_LONG4)
_PAE_LOWER = _LONG4[2:]


def walk(
    read_phys: ReadPhys,
    ctx: PagingContext,
    linear: int,
    *,
    maxphyaddr: int = DEFAULT_MAXPHYADDR,
) -> Translation:
    """Translate ``linear`` under ``ctx`` without caching.  PageFault if it does not map."""
    _check_maxphyaddr(maxphyaddr)
    if linear < 0:
        raise ValueError(f"negative linear address {linear}")
    mode = ctx.mode
    if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
        if linear >= _ADDR_LIMIT_64:
            raise PageFault(linear, None, FaultKind.OUT_OF_RANGE)
        if not is_canonical(linear, mode.linear_width):
            raise PageFault(
                linear, None, FaultKind.NON_CANONICAL, detail=f"{mode.linear_width}-bit"
            )
        specs = _LONG5 if mode is PagingMode.LEVEL5 else _LONG4
        table = ctx.cr3 & phys_mask(maxphyaddr) & ~0xFFF
        return _walk_8byte(read_phys, linear, table, specs, ctx.nxe, maxphyaddr, long_mode=True)
    # Without paging the whole linear space is one identity "page": 4 GiB, or
    # all 64 bits in the flat long mode an emulator can be in (LMA=1, PG=0).
    limit = _ADDR_LIMIT_64 if mode is PagingMode.NONE and ctx.efer & EFER_LMA else _ADDR_LIMIT_32
    if linear >= limit:
        raise PageFault(
            linear,
            None,
            FaultKind.OUT_OF_RANGE,
            detail=f"{limit.bit_length() - 1}-bit linear addresses",
        )
    if mode is PagingMode.NONE:
        return Translation(linear, linear, limit, True, True, False, Level.NONE)
    if mode is PagingMode.PAE:
        return _walk_pae(read_phys, ctx, linear, maxphyaddr)
    return _walk_32bit(read_phys, ctx, linear, maxphyaddr)


def _read_entry(read_phys: ReadPhys, gpa: int, size: int, linear: int, level: Level) -> int:
    try:
        raw = read_phys(gpa, size)
    except GuestMemoryFault as exc:
        raise PageFault(
            linear, level, FaultKind.UNREADABLE, entry_gpa=gpa, detail=exc.reason
        ) from exc
    if len(raw) != size:
        raise PageFault(
            linear, level, FaultKind.UNREADABLE, entry_gpa=gpa, detail=f"short read ({len(raw)})"
        )
    return int.from_bytes(raw, "little")


def _walk_8byte(
    read_phys: ReadPhys,
    linear: int,
    table: int,
    specs: tuple[_LevelSpec, ...],
    nxe: bool,
    maxphyaddr: int,
    *,
    long_mode: bool,
    writable: bool = True,
    user: bool = True,
) -> Translation:
    """The 8-byte-entry levels shared by PAE (PDE, PTE) and IA-32e paging."""
    # Bits above MAXPHYADDR are reserved: up to bit 51 in IA-32e entries
    # (62:52 are ignored/protection keys), up to bit 62 in PAE entries.
    top = 52 if long_mode else 63
    rsvd_high = ((1 << top) - 1) & ~((1 << maxphyaddr) - 1)
    if not nxe:
        rsvd_high |= PTE_XD
    addr_mask = (1 << maxphyaddr) - 1
    nx = False
    for spec in specs:
        entry_gpa = table + ((linear >> spec.shift) & 0x1FF) * 8
        entry = _read_entry(read_phys, entry_gpa, 8, linear, spec.level)
        if not entry & PTE_P:
            raise PageFault(
                linear, spec.level, FaultKind.NOT_PRESENT, entry=entry, entry_gpa=entry_gpa
            )
        rsvd = rsvd_high
        leaf = spec.shift == 12 or (spec.large and bool(entry & PTE_PS))
        if spec.shift != 12:
            if leaf:
                # Large page: bit 12 is PAT, bits shift-1:13 must be zero.
                rsvd |= ((1 << spec.shift) - 1) & ~((1 << 13) - 1)
            elif not spec.large:
                rsvd |= PTE_PS  # PS is reserved in PML5E/PML4E
        if entry & rsvd:
            raise PageFault(
                linear,
                spec.level,
                FaultKind.RESERVED,
                entry=entry,
                entry_gpa=entry_gpa,
                detail=f"bits {entry & rsvd:#x}",
            )
        writable = writable and bool(entry & PTE_RW)
        user = user and bool(entry & PTE_US)
        nx = nx or (nxe and bool(entry & PTE_XD))
        if leaf:
            size = 1 << spec.shift
            base = entry & addr_mask & ~(size - 1)
            return Translation(
                linear, base | (linear & (size - 1)), size, writable, user, nx, spec.level, entry
            )
        table = entry & addr_mask & ~0xFFF
    raise AssertionError("unreachable: the PTE level is always a leaf")


# PAE PDPTE reserved bits (SDM table 4-8): 2:1 and 8:5; 63:MAXPHYADDR below.
_PAE_PDPTE_RSVD_LOW = 0b1_1110_0110


def _walk_pae(read_phys: ReadPhys, ctx: PagingContext, linear: int, maxphyaddr: int) -> Translation:
    # The CPU loads the four PDPTEs when CR3 is written; a debugger can only
    # read them from memory, which is what the guest last wrote there.
    entry_gpa = (ctx.cr3 & 0xFFFF_FFE0) + (linear >> 30) * 8
    entry = _read_entry(read_phys, entry_gpa, 8, linear, Level.PDPTE)
    if not entry & PTE_P:
        raise PageFault(
            linear, Level.PDPTE, FaultKind.NOT_PRESENT, entry=entry, entry_gpa=entry_gpa
        )
    rsvd = _PAE_PDPTE_RSVD_LOW | (~((1 << maxphyaddr) - 1) & (_ADDR_LIMIT_64 - 1))
    if entry & rsvd:
        raise PageFault(
            linear,
            Level.PDPTE,
            FaultKind.RESERVED,
            entry=entry,
            entry_gpa=entry_gpa,
            detail=f"bits {entry & rsvd:#x}",
        )
    table = entry & ((1 << maxphyaddr) - 1) & ~0xFFF
    # PAE PDPTEs carry no R/W, U/S or XD: the lower levels decide.
    return _walk_8byte(read_phys, linear, table, _PAE_LOWER, ctx.nxe, maxphyaddr, long_mode=False)


def _walk_32bit(
    read_phys: ReadPhys, ctx: PagingContext, linear: int, maxphyaddr: int
) -> Translation:
    pde_gpa = (ctx.cr3 & 0xFFFF_F000) + (linear >> 22) * 4
    pde = _read_entry(read_phys, pde_gpa, 4, linear, Level.PDE32)
    if not pde & PTE_P:
        raise PageFault(linear, Level.PDE32, FaultKind.NOT_PRESENT, entry=pde, entry_gpa=pde_gpa)
    if ctx.cr4 & CR4_PSE and pde & PTE_PS:
        # 4 MiB page; PSE-36 puts physical bits M-1:32 in PDE bits M-20:13
        # with M = min(MAXPHYADDR, 40), and bits 21:M-19 are reserved.
        m = min(maxphyaddr, 40)
        high_bits = m - 32
        rsvd = ((1 << 22) - 1) & ~((1 << (13 + high_bits)) - 1)
        if pde & rsvd:
            raise PageFault(
                linear,
                Level.PDE32,
                FaultKind.RESERVED,
                entry=pde,
                entry_gpa=pde_gpa,
                detail=f"bits {pde & rsvd:#x}",
            )
        high = (pde >> 13) & ((1 << high_bits) - 1)
        base = (pde & 0xFFC0_0000) | (high << 32)
        return Translation(
            linear,
            base | (linear & (MIB4 - 1)),
            MIB4,
            bool(pde & PTE_RW),
            bool(pde & PTE_US),
            False,
            Level.PDE32,
            pde,
        )
    # Without CR4.PSE, PDE bit 7 is ignored and the PDE always references a table.
    pte_gpa = (pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4
    pte = _read_entry(read_phys, pte_gpa, 4, linear, Level.PTE32)
    if not pte & PTE_P:
        raise PageFault(linear, Level.PTE32, FaultKind.NOT_PRESENT, entry=pte, entry_gpa=pte_gpa)
    return Translation(
        linear,
        (pte & 0xFFFF_F000) | (linear & 0xFFF),
        KIB4,
        bool(pde & pte & PTE_RW),
        bool(pde & pte & PTE_US),
        False,
        Level.PTE32,
        pte,
    )


def split_range(
    translate: Callable[[int], Translation], linear: int, size: int
) -> list[tuple[int, int]]:
    """Translate every page ``[linear, linear+size)`` touches: a list of
    (gpa, length) chunks, split at the boundaries of the pages actually mapped.
    Every page is translated before the list is returned, so a fault anywhere
    raises before the caller touches memory."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    chunks: list[tuple[int, int]] = []
    end = linear + size
    while linear < end:
        t = translate(linear)
        length = min(t.page_size - t.offset, end - linear)
        chunks.append((t.gpa, length))
        linear += length
    return chunks


def walk_range(
    read_phys: ReadPhys,
    ctx: PagingContext,
    linear: int,
    size: int,
    *,
    maxphyaddr: int = DEFAULT_MAXPHYADDR,
) -> list[tuple[int, int]]:
    """``split_range`` over uncached walks."""
    return split_range(lambda la: walk(read_phys, ctx, la, maxphyaddr=maxphyaddr), linear, size)
