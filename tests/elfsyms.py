"""Symbol addresses of the test guests (from their ELF symbol tables)."""

from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection


def symbols(elf: Path, field: str = "st_value") -> dict[str, int]:
    """Name → ``field`` (the address by default) of every named symbol."""
    with Path(elf).open("rb") as f:
        tab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(tab, SymbolTableSection)
        return {s.name: int(s[field]) for s in tab.iter_symbols() if s.name}
