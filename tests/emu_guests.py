"""Tiny guests for the emulated-backend tests, assembled with binutils.

``build_guest(tmp, source)`` wraps AT&T-syntax ``source`` into an ELF whose
``_start`` is at 0x100000 (text) with a data page at 0x200000 (``.data``,
symbol ``data``), links it with ``ld`` and returns the path and its symbols.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

TEXT = 0x100000
DATA = 0x200000

_LINKER_SCRIPT = """\
ENTRY(_start)
SECTIONS {{
  . = {text:#x};
  .text : {{ *(.text) }}
  . = {data:#x};
  .data : {{ *(.data) }}
  .bss : {{ *(.bss) }}
}}
"""


@dataclass(frozen=True)
class Guest:
    path: Path
    symbols: dict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.symbols[name]


def build_guest(tmp: Path, source: str, *, bits: int = 64, name: str = "guest") -> Guest:
    """Assemble and link ``source``; raises CalledProcessError on a build error."""
    src = tmp / f"{name}.S"
    obj = tmp / f"{name}.o"
    elf = tmp / f"{name}.elf"
    lds = tmp / f"{name}.ld"
    src.write_text(f".code{bits}\n.globl _start\n.text\n{source}\n")
    lds.write_text(_LINKER_SCRIPT.format(text=TEXT, data=DATA))
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(src)], check=True, capture_output=True)
    emulation = "elf_x86_64" if bits == 64 else "elf_i386"
    subprocess.run(
        ["ld", "-m", emulation, "-nostdlib", "-static", "-z", "max-page-size=0x1000",
         "-T", str(lds), "-o", str(elf), str(obj)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    with open(elf, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(table, SymbolTableSection)
        symbols = {s.name: s["st_value"] for s in table.iter_symbols() if s.name}
    return Guest(elf, symbols)
