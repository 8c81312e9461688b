"""Test helpers: a sparse fake physical memory and a page-table builder.

The builder writes entries the way a guest kernel would, for every x86 paging
mode, so tests state mappings ("map this linear 2 MiB page here") and the
walker under test has to find them again.  Named a fake on purpose: the real
thing it stands in for is guest RAM, which Unicorn provides in
test_paging_unicorn.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    PagingContext,
    PagingMode,
)
from xendbg.errors import GuestMemoryFault

PAGE = KIB4


class SparseMemory:
    """Guest-physical memory made of 4 KiB bytearrays; unbacked pages fault."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.reads = 0

    def back(self, gpa: int, size: int = PAGE) -> None:
        for page in range(gpa & ~(PAGE - 1), gpa + size, PAGE):
            self.pages.setdefault(page, bytearray(PAGE))

    def read_phys(self, gpa: int, size: int) -> bytes:
        self.reads += 1
        out = bytearray()
        while size:
            page = self.pages.get(gpa & ~(PAGE - 1))
            if page is None:
                raise GuestMemoryFault(gpa)
            off = gpa & (PAGE - 1)
            n = min(size, PAGE - off)
            out += page[off : off + n]
            gpa += n
            size -= n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        end = gpa + len(data)
        for page in range(gpa & ~(PAGE - 1), end, PAGE):  # check first: all or nothing
            if page not in self.pages:
                raise GuestMemoryFault(max(page, gpa))
        pos = 0
        while gpa < end:
            off = gpa & (PAGE - 1)
            n = min(end - gpa, PAGE - off)
            self.pages[gpa - off][off : off + n] = data[pos : pos + n]
            gpa += n
            pos += n

    def snapshot(self) -> dict[int, bytes]:
        return {k: bytes(v) for k, v in self.pages.items()}


class ReadOnlyPhys:
    """What the walker is given: an object with a read method and nothing else,
    recording every call so a test can see what was read."""

    __slots__ = ("_read", "calls")

    def __init__(self, read: Callable[[int, int], bytes]) -> None:
        self._read = read
        self.calls: list[tuple[int, int]] = []

    def __call__(self, gpa: int, size: int) -> bytes:
        self.calls.append((gpa, size))
        return self._read(gpa, size)


class MappingConflict(ValueError):
    """The requested mapping overlaps an existing page or table."""


@dataclass(frozen=True)
class _Lvl:
    name: str
    shift: int
    index_bits: int


_LEVELS: dict[PagingMode, tuple[_Lvl, ...]] = {
    PagingMode.BITS32: (_Lvl("PDE32", 22, 10), _Lvl("PTE32", 12, 10)),
    PagingMode.PAE: (_Lvl("PDPTE", 30, 2), _Lvl("PDE", 21, 9), _Lvl("PTE", 12, 9)),
    PagingMode.LEVEL4: (
        _Lvl("PML4E", 39, 9),
        _Lvl("PDPTE", 30, 9),
        _Lvl("PDE", 21, 9),
        _Lvl("PTE", 12, 9),
    ),
    PagingMode.LEVEL5: (
        _Lvl("PML5E", 48, 9),
        _Lvl("PML4E", 39, 9),
        _Lvl("PDPTE", 30, 9),
        _Lvl("PDE", 21, 9),
        _Lvl("PTE", 12, 9),
    ),
}

_LEAF_SHIFT = {KIB4: 12, MIB2: 21, MIB4: 22, GIB1: 30}


class PageTableBuilder:
    """Builds one address space's tables in ``mem`` (writes through ``write``).

    Tables come from a bump allocator starting at ``table_base``.  Intermediate
    entries are created present, writable and user; ``set_flags`` edits any
    entry afterwards to test how permissions combine.
    """

    def __init__(
        self,
        mode: PagingMode,
        *,
        read: Callable[[int, int], bytes],
        write: Callable[[int, bytes], None],
        back: Callable[[int, int], None] | None = None,
        table_base: int = 0x10_0000,
        nxe: bool = True,
        pse: bool = True,
    ) -> None:
        if mode is PagingMode.NONE:
            raise ValueError("no tables without paging")
        self.mode = mode
        self._read = read
        self._write = write
        self._back = back
        self._next = table_base
        self.nxe = nxe
        self.pse = pse
        self.levels = _LEVELS[mode]
        self.esize = 4 if mode is PagingMode.BITS32 else 8
        if mode is PagingMode.PAE:
            # The PDPT is 32 bytes; put it at an odd 32-byte slot to exercise CR3 bits 11:5.
            page = self.alloc_page()
            self.root = page + 0x60
        else:
            self.root = self.alloc_page()
        self.tables = {self.root}

    @classmethod
    def on(cls, mem: SparseMemory, mode: PagingMode, **kw: object) -> PageTableBuilder:
        return cls(mode, read=mem.read_phys, write=mem.write, back=mem.back, **kw)  # type: ignore[arg-type]

    # -- memory ---------------------------------------------------------------
    def alloc_page(self) -> int:
        gpa = self._next
        self._next += PAGE
        if self._back is not None:
            self._back(gpa, PAGE)
        self._write(gpa, bytes(PAGE))
        return gpa

    def read_entry(self, gpa: int) -> int:
        return int.from_bytes(self._read(gpa, self.esize), "little")

    def write_entry(self, gpa: int, value: int) -> None:
        self._write(gpa, value.to_bytes(self.esize, "little"))

    # -- control registers ------------------------------------------------------
    @property
    def context(self) -> PagingContext:
        cr0 = CR0_PG | CR0_PE | CR0_WP
        cr4 = CR4_PSE if self.pse else 0
        efer = EFER_NXE if self.nxe else 0
        if self.mode is not PagingMode.BITS32:
            cr4 |= CR4_PAE
        if self.mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
            efer |= EFER_LME | EFER_LMA
        if self.mode is PagingMode.LEVEL5:
            cr4 |= CR4_LA57
        return PagingContext(cr0, self.root, cr4, efer)

    # -- mapping ----------------------------------------------------------------
    def _index(self, lvl: _Lvl, linear: int) -> int:
        return (linear >> lvl.shift) & ((1 << lvl.index_bits) - 1)

    def entry_gpa(self, linear: int, level: str) -> int:
        """Where the entry of ``level`` for ``linear`` lives (its table must exist)."""
        table = self.root
        for lvl in self.levels:
            gpa = table + self._index(lvl, linear) * self.esize
            if lvl.name == level:
                return gpa
            entry = self.read_entry(gpa)
            if not entry & PTE_P or self._is_leaf(lvl, entry):
                raise KeyError(f"no {level} for {linear:#x}")
            table = entry & 0x000F_FFFF_FFFF_F000
        raise KeyError(level)

    def _is_leaf(self, lvl: _Lvl, entry: int) -> bool:
        if lvl.shift == 12 or not entry & PTE_PS:
            return lvl.shift == 12
        if self.mode is PagingMode.PAE and lvl.name == "PDPTE":
            return False
        return not (self.mode is PagingMode.BITS32 and not self.pse)

    def set_flags(self, linear: int, level: str, *, set: int = 0, clear: int = 0) -> None:
        gpa = self.entry_gpa(linear, level)
        self.write_entry(gpa, (self.read_entry(gpa) | set) & ~clear)

    def map(
        self,
        linear: int,
        gpa: int,
        size: int = KIB4,
        *,
        writable: bool = True,
        user: bool = True,
        nx: bool = False,
    ) -> None:
        """Map the page of ``size`` at ``linear`` to ``gpa``.  MappingConflict if
        the slot is taken by a page or (for a large page) by a table."""
        shift = _LEAF_SHIFT[size]
        if linear & (size - 1) or gpa & (size - 1):
            raise ValueError("unaligned mapping")
        if size not in self.mode.page_sizes:
            raise ValueError(f"{size:#x} pages do not exist in {self.mode.value} paging")
        if size == MIB4 and not self.pse:
            raise ValueError("4 MiB pages need CR4.PSE")
        table = self.root
        for lvl in self.levels:
            egpa = table + self._index(lvl, linear) * self.esize
            entry = self.read_entry(egpa)
            if lvl.shift == shift:
                if entry & PTE_P:
                    raise MappingConflict(f"{lvl.name} for {linear:#x} in use")
                self.write_entry(egpa, self._leaf(gpa, size, writable, user, nx))
                return
            if entry & PTE_P:
                if self._is_leaf(lvl, entry):
                    raise MappingConflict(f"{linear:#x} lies in a large page")
                table = entry & 0x000F_FFFF_FFFF_F000
                continue
            table = self.alloc_page()
            self.tables.add(table)
            if self.mode is PagingMode.PAE and lvl.name == "PDPTE":
                self.write_entry(egpa, table | PTE_P)  # PAE PDPTEs have no R/W, U/S
            else:
                self.write_entry(egpa, table | PTE_P | PTE_RW | PTE_US)
        raise AssertionError("no level for this page size")

    def _leaf(self, gpa: int, size: int, writable: bool, user: bool, nx: bool) -> int:
        e = PTE_P | (PTE_RW if writable else 0) | (PTE_US if user else 0)
        if size != KIB4:
            e |= PTE_PS
        if size == MIB4:
            # PSE-36: physical bits 39:32 go to PDE bits 20:13.
            e |= (gpa & 0xFFC0_0000) | ((gpa >> 32) << 13)
            return e
        e |= gpa
        if nx:
            if self.esize == 4:
                raise ValueError("32-bit paging has no XD bit")
            e |= PTE_XD
        return e
