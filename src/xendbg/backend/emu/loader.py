"""ELF guest images and the boot state the emulated backend starts them in.

Boot contract (what tests and users rely on):

* ELF64 x86-64 ``ET_EXEC``: every ``PT_LOAD`` is copied to its ``p_paddr``
  (bss zero-filled up to ``p_memsz``); each vCPU starts at ``e_entry`` in
  64-bit long mode, interrupts off, ``RDI`` = vCPU index, other GPRs 0.
  CR3 points at loader-built tables at the top of guest RAM that identity-map
  the first 4 GiB with 2 MiB pages; CR0 = PE|MP|ET|NE|WP|PG, CR4 = PAE|OSFXSR,
  EFER = LME|LMA|NXE; CS = 0x08 (64-bit code), other selectors 0x10 (flat data),
  from a GDT next to the tables.
* ELF32 i386 ``ET_EXEC``: flat 32-bit protected mode, paging off, same GDT
  layout with a 32-bit code segment, ``EDI`` = vCPU index.

The boot area (tables and GDT, :data:`BOOT_AREA_SIZE` bytes at the top of RAM)
must not overlap any segment: GuestImageError otherwise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from xendbg.backend.emu.ram import PAGE_SIZE, GuestRam
from xendbg.errors import GuestImageError

EM_386 = 3
EM_X86_64 = 62

# Boot area layout, offsets from its base: PML4, PDPT, 4 PDs, GDT.
BOOT_AREA_SIZE = 8 * PAGE_SIZE
_PML4 = 0x0000
_PDPT = 0x1000
_PD0 = 0x2000
_GDT = 0x6000

# Paging-structure and descriptor bits (SDM vol. 3A 4.5, 3.4.5).
_PTE_P_RW = 0x3
_PDE_PS = 0x80
GDT_CODE64 = 0x00209A0000000000  # P, DPL0, code exec/read, L
GDT_CODE32 = 0x00CF9A000000FFFF  # P, DPL0, code exec/read, D, G, limit 4 GiB
GDT_DATA = 0x00CF92000000FFFF  # P, DPL0, data read/write, B, G, limit 4 GiB
SEL_CODE = 0x08
SEL_DATA = 0x10
GDT_LIMIT = 3 * 8 - 1

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
MSR_EFER = 0xC0000080


@dataclass(frozen=True, slots=True)
class Segment:
    """One PT_LOAD: ``data`` goes to ``paddr``, zeros up to ``memsz``."""

    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True, slots=True)
class GuestImage:
    path: str
    word_size: int  # 8: ELF64 x86-64, 4: ELF32 i386
    entry: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class BootState:
    """Initial control state shared by every vCPU."""

    word_size: int
    entry: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt_base: int
    gdt_limit: int


def load_image(path: str | Path) -> GuestImage:
    """Parse and validate ``path``; GuestImageError with the reason otherwise."""
    try:
        with open(path, "rb") as f:
            return _parse(str(path), ELFFile(f))
    except OSError as e:
        raise GuestImageError(f"{path}: cannot read: {e.strerror or e}") from e
    except ELFError as e:
        raise GuestImageError(f"{path}: not a valid ELF file: {e}") from e


def _parse(path: str, elf: ELFFile) -> GuestImage:
    machine = elf["e_machine"]
    elfclass = elf.elfclass
    if (elfclass, machine) == (64, "EM_X86_64"):
        word_size = 8
    elif (elfclass, machine) == (32, "EM_386"):
        word_size = 4
    else:
        raise GuestImageError(
            f"{path}: unsupported ELF{elfclass} machine {machine}: need ELF64 x86-64 or ELF32 i386"
        )
    if elf.little_endian is not True:
        raise GuestImageError(f"{path}: big-endian ELF")
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"]]
    if not loads:
        raise GuestImageError(f"{path}: no PT_LOAD segment")
    etype = elf["e_type"]
    if etype == "ET_DYN":
        if min(s["p_paddr"] for s in loads) == 0:
            raise GuestImageError(
                f"{path}: ET_DYN image without fixed load addresses (p_paddr 0); "
                "link it as a static executable at a fixed address"
            )
    elif etype != "ET_EXEC":
        raise GuestImageError(f"{path}: ELF type {etype} is not an executable")
    segments = []
    for s in loads:
        if s["p_filesz"] > s["p_memsz"]:
            raise GuestImageError(f"{path}: PT_LOAD at {s['p_paddr']:#x} has p_filesz > p_memsz")
        segments.append(Segment(s["p_paddr"], s.data(), s["p_memsz"]))
    return GuestImage(path, word_size, elf["e_entry"], tuple(segments))


def boot_area_base(memory: int) -> int:
    return memory - BOOT_AREA_SIZE


def install(image: GuestImage, ram: GuestRam) -> BootState:
    """Copy the segments into ``ram`` and build the boot tables; returns the boot state."""
    if ram.size < 2 * BOOT_AREA_SIZE:
        raise GuestImageError(f"guest memory of {ram.size:#x} bytes is too small")
    area = boot_area_base(ram.size)
    for seg in image.segments:
        end = seg.paddr + seg.memsz
        if seg.paddr < 0 or end > ram.size:
            raise GuestImageError(
                f"{image.path}: segment [{seg.paddr:#x}, {end:#x}) lies outside guest "
                f"RAM [0, {ram.size:#x}); give the domain more memory"
            )
        if end > area:
            raise GuestImageError(
                f"{image.path}: segment [{seg.paddr:#x}, {end:#x}) overlaps the loader's "
                f"boot tables at [{area:#x}, {ram.size:#x}); give the domain more memory"
            )
    limit = 1 << 32
    if not 0 <= image.entry < min(limit, ram.size):
        raise GuestImageError(
            f"{image.path}: entry point {image.entry:#x} is outside the identity-mapped RAM"
        )
    for seg in image.segments:
        ram.write(seg.paddr, seg.data)
        ram.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
    gdt = area + _GDT
    code = GDT_CODE64 if image.word_size == 8 else GDT_CODE32
    ram.write(gdt, struct.pack("<3Q", 0, code, GDT_DATA))
    if image.word_size == 4:
        return BootState(4, image.entry, CR0_PE | CR0_ET, 0, 0, 0, gdt, GDT_LIMIT)
    ram.write(area + _PML4, struct.pack("<Q", (area + _PDPT) | _PTE_P_RW) + bytes(4088))
    pdpt = b"".join(struct.pack("<Q", (area + _PD0 + i * PAGE_SIZE) | _PTE_P_RW) for i in range(4))
    ram.write(area + _PDPT, pdpt + bytes(PAGE_SIZE - len(pdpt)))
    pd = struct.pack("<2048Q", *(((i << 21) | _PDE_PS | _PTE_P_RW) for i in range(2048)))
    ram.write(area + _PD0, pd)
    return BootState(
        8,
        image.entry,
        CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        area + _PML4,
        CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        EFER_LME | EFER_LMA | EFER_NXE,
        gdt,
        GDT_LIMIT,
    )
