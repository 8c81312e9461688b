"""ELF symbol tables (pyelftools): names → addresses and addresses → ``name+0x4``.

Naming an address prefers, in order: a sized FUNC/OBJECT symbol that contains it
(the innermost one), then the nearest symbol before it in the same allocated
section (labels such as ``banner`` or ``msg_hh``).  Absolute (SHN_ABS) symbols
are constants and linker bookkeeping (``PAGE_SIZE``, ``hh_data_phys``): they are
found by name but never used to name an address.
"""

from __future__ import annotations

import bisect
import fnmatch
import os
from dataclasses import dataclass
from typing import Any

from xendbg.errors import GuestImageError

_TYPES = {
    "STT_FUNC": "func",
    "STT_OBJECT": "object",
    "STT_NOTYPE": "notype",
    "STT_GNU_IFUNC": "func",
    "STT_TLS": "tls",
    "STT_COMMON": "object",
}


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    addr: int
    size: int
    kind: str  # "func", "object", "notype", "tls"
    is_global: bool
    absolute: bool  # SHN_ABS: a constant, not a location
    section: tuple[int, int] | None  # [start, end) of its allocated section, offset applied

    @property
    def rank(self) -> int:
        """Higher is a better name for an address (typed beats label; global beats local)."""
        return (2 if self.kind in ("func", "object") else 0) + (1 if self.is_global else 0)


class SymbolTable:
    def __init__(self) -> None:
        self.files: list[tuple[str, int]] = []
        self._by_name: dict[str, list[Symbol]] = {}
        self._sized: list[Symbol] = []  # sorted by (addr, rank)
        self._sized_keys: list[int] = []
        self._labels: list[Symbol] = []  # every non-absolute symbol, sorted by (addr, rank)
        self._label_keys: list[int] = []

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    def load(self, path: str, offset: int = 0) -> int:
        """Add the ``.symtab`` (or ``.dynsym``) of ELF ``path``, every address + ``offset``.
        Returns how many symbols were added."""
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection

        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                sections = [
                    (s["sh_addr"], s["sh_size"], s["sh_flags"]) for s in elf.iter_sections()
                ]
                table = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
                if not isinstance(table, SymbolTableSection):
                    raise GuestImageError(f"{path}: no symbol table (stripped?)")
                added = [
                    s
                    for s in (self._symbol(raw, sections, offset) for raw in table.iter_symbols())
                    if s is not None
                ]
        except OSError as e:
            raise GuestImageError(f"{path}: {os.strerror(e.errno or 0)}") from e
        except ELFError as e:
            raise GuestImageError(f"{path}: not an ELF file ({e})") from e
        for sym in added:
            self._by_name.setdefault(sym.name, []).append(sym)
        self.files.append((path, offset))
        self._reindex()
        return len(added)

    @staticmethod
    def _symbol(raw: Any, sections: list[tuple[int, int, int]], offset: int) -> Symbol | None:
        kind = _TYPES.get(raw["st_info"]["type"])
        name = raw.name
        shndx = raw["st_shndx"]
        if kind is None or not name or shndx == "SHN_UNDEF":
            return None  # FILE / SECTION symbols, undefined references
        absolute = shndx == "SHN_ABS"
        section = None
        if isinstance(shndx, int) and shndx < len(sections):
            start, size, flags = sections[shndx]
            if flags & 0x2:  # SHF_ALLOC
                section = (start + offset, start + size + offset)
        addr = raw["st_value"] + (0 if absolute else offset)
        return Symbol(
            name,
            addr,
            raw["st_size"],
            kind,
            raw["st_info"]["bind"] != "STB_LOCAL",
            absolute,
            section,
        )

    def _reindex(self) -> None:
        syms = [s for group in self._by_name.values() for s in group if not s.absolute]
        syms.sort(key=lambda s: (s.addr, s.rank))
        self._labels = syms
        self._label_keys = [s.addr for s in syms]
        self._sized = [s for s in syms if s.size > 0 and s.kind in ("func", "object")]
        self._sized_keys = [s.addr for s in self._sized]

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    # -- lookups ------------------------------------------------------------------
    def address(self, name: str) -> int | None:
        """Address of ``name``: a FUNC/OBJECT beats a label, a global beats a local."""
        cands = self._by_name.get(name)
        if not cands:
            return None
        return max(cands, key=lambda s: (not s.absolute, s.rank)).addr

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def matching(self, pattern: str = "*") -> list[Symbol]:
        """Symbols whose name matches the glob ``pattern`` (a plain word: substring)."""
        if not any(c in pattern for c in "*?["):
            pattern = f"*{pattern}*"
        out = [
            s
            for name, group in self._by_name.items()
            if fnmatch.fnmatchcase(name, pattern)
            for s in group
        ]
        return sorted(out, key=lambda s: (s.absolute, s.addr, s.name))

    def lookup(self, addr: int) -> tuple[Symbol, int] | None:
        """The symbol that best names ``addr`` and the offset into it."""
        i = bisect.bisect_right(self._sized_keys, addr)
        # Sized symbols rarely nest; a few steps back find an enclosing one.
        for j in range(i - 1, max(i - 9, -1), -1):
            s = self._sized[j]
            if s.addr <= addr < s.addr + s.size:
                return s, addr - s.addr
        i = bisect.bisect_right(self._label_keys, addr)
        if i == 0:
            return None
        s = self._labels[i - 1]
        if s.section is None or not s.section[0] <= addr < s.section[1]:
            return None
        return s, addr - s.addr

    def describe(self, addr: int) -> str | None:
        """``main_loop``, ``main_loop+0x4`` or None."""
        hit = self.lookup(addr)
        if hit is None:
            return None
        sym, off = hit
        return sym.name if off == 0 else f"{sym.name}+{off:#x}"
