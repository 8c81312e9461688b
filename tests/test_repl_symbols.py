"""ELF symbols, disassembly windows, register names and the rendered context view."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from rich.text import Text

from xendbg.arch.x86.regnames import BASE
from xendbg.errors import GuestImageError
from xendbg.frontend.repl import context, disasm
from xendbg.frontend.repl.regs import RegisterNames, flag_names
from xendbg.frontend.repl.symbols import SymbolTable


def nm_symbols(elf: Path) -> dict[str, int]:
    """Symbol → address as binutils' nm sees it (the reference)."""
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    table: dict[str, int] = {}
    for line in out.splitlines():
        addr, kind, name = line.split()
        if kind in "TtDdBbRr":
            table[name] = int(addr, 16)
    return table


@pytest.fixture(scope="module")
def longmode(guests: Path) -> SymbolTable:
    t = SymbolTable()
    assert t.load(str(guests / "longmode.elf")) > 0
    return t


def test_addresses_agree_with_nm(guests: Path, longmode: SymbolTable) -> None:
    ref = nm_symbols(guests / "longmode.elf")
    for name in ("main_loop", "tick", "compute", "counter", "watched", "hh_data", "high_entry"):
        assert longmode.address(name) == ref[name]
    assert longmode.address("nosuch") is None


def test_naming_prefers_typed_symbols_and_skips_absolute_ones(
    guests: Path, longmode: SymbolTable
) -> None:
    ref = nm_symbols(guests / "longmode.elf")
    main = ref["main_loop"]
    assert longmode.describe(main) == "main_loop"
    assert longmode.describe(main + 4) == "main_loop+0x4"
    assert longmode.describe(ref["tick"] + 0x13) == "tick+0x13"
    # An untyped label inside its section names the bytes after it.
    assert longmode.describe(ref["msg_hh"] + 2) == "msg_hh+0x2"
    # Inside a sized object.
    assert longmode.describe(ref["stacks"] + 0x3FF8) == "stacks+0x3ff8"
    # hh_data_phys / image_end_phys are SHN_ABS: never used to name an address.
    hh_phys = longmode.address("hh_data_phys")
    assert hh_phys is not None
    assert longmode.describe(hh_phys) is None
    assert longmode.describe(0x5) is None


def test_glob_and_substring_listing(longmode: SymbolTable) -> None:
    assert [s.name for s in longmode.matching("comp*")] == ["compute"]
    names = {s.name for s in longmode.matching("pvh_start")}
    assert {"pvh_start32", "pvh_start_info"} <= names


def test_load_with_offset_and_clear(guests: Path) -> None:
    t = SymbolTable()
    t.load(str(guests / "smp.elf"), 0x1000)
    ref = nm_symbols(guests / "smp.elf")
    assert t.address("worker") == ref["worker"] + 0x1000
    assert t.describe(ref["worker"] + 0x1001) == "worker+0x1"
    t.clear()
    assert len(t) == 0 and t.address("worker") is None


def test_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    t = SymbolTable()
    with pytest.raises(GuestImageError, match="No such file"):
        t.load(str(tmp_path / "missing.elf"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an elf at all")
    with pytest.raises(GuestImageError, match="not an ELF"):
        t.load(str(junk))


def test_disassembly_window_finds_instruction_boundaries(
    guests: Path, longmode: SymbolTable
) -> None:
    # Disassemble main_loop from the file itself and compare with objdump.
    from elftools.elf.elffile import ELFFile

    with open(guests / "longmode.elf", "rb") as f:
        elf = ELFFile(f)
        text = elf.get_section_by_name(".text")
        base, code = text["sh_addr"], text.data()
    main = longmode.address("main_loop")
    assert main is not None

    def read(addr: int, size: int) -> bytes:
        lo = max(addr, base)
        return code[lo - base : lo - base + size] if lo == addr else b""

    insns = disasm.disassemble(code, base, 64)
    pc = next(i for i in insns if i.addr > main + 8).addr
    win = disasm.window(read, pc, 64, 3, 4, starts=[main])
    addrs = [i.addr for i in win]
    assert pc in addrs and addrs.index(pc) == 3 and len(win) == 7
    ref = [i.addr for i in insns]
    start = ref.index(pc)
    assert addrs == ref[start - 3 : start + 4]
    dump = subprocess.run(["objdump", "-d", "-M", "intel", "--start-address", hex(pc),
                           "--stop-address", hex(win[3].end), str(guests / "longmode.elf")],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    objdump_text = dump.strip().splitlines()[-1].split("\t")[-1]
    assert objdump_text.replace(" ", "") == win[3].text.replace(" ", "")


def test_register_names_and_subregisters() -> None:
    names = RegisterNames(8, frozenset(BASE))
    regs = {"rax": 0x1122334455667788, "rip": 0x1000, "rflags": 0x246, "r8": 0xAABBCCDD11223344}
    assert names.read(regs, "eax") == 0x55667788
    assert names.read(regs, "ax") == 0x7788
    assert names.read(regs, "ah") == 0x77
    assert names.read(regs, "al") == 0x88
    assert names.read(regs, "r8d") == 0x11223344
    assert names.read(regs, "pc") == 0x1000
    assert names.read(regs, "eflags") == 0x246
    assert names.update(regs, "ah", 0xFF) == {"rax": 0x112233445566FF88}
    assert names.update(regs, "eax", 1) == {"rax": 0x1122334400000001}
    i386 = RegisterNames(4, frozenset(BASE))
    assert i386.display_name("rax") == "eax" and i386.display_name("rip") == "eip"
    assert "r8d" not in i386.names()
    assert flag_names(0x246) == "[ PF ZF IF ]"


def _styles_of(line: Text, needle: str) -> set[str]:
    start = line.plain.index(needle)
    return {str(s.style) for s in line.spans if s.start <= start < s.end}


def test_changed_registers_are_highlighted() -> None:
    names = RegisterNames(8, frozenset(BASE))
    before = {r: 0 for r in BASE}
    after = dict(before, rax=0x11, rip=0xFFFFFFFF8010D014)
    lines = context.register_lines(
        names, after, before, lambda a: "main_loop" if a == after["rip"] else None
    )
    text = "\n".join(line.plain for line in lines)
    assert "rax    0x0000000000000011" in text
    assert "rip    0xffffffff8010d014 <main_loop>" in text
    rax_line = next(line for line in lines if "rax" in line.plain)
    assert context.CHANGED in _styles_of(rax_line, "0x0000000000000011")
    assert context.CHANGED not in _styles_of(rax_line, "0x0000000000000000")
    # No previous view: nothing is marked as changed.
    first = context.register_lines(names, after, None, lambda a: None)
    assert all(context.CHANGED not in {str(s.style) for s in line.spans} for line in first)


def test_code_lines_mark_pc_breakpoints_and_branch_targets() -> None:
    insns = [
        disasm.Insn(0x1000, 5, b"\xe8\x00\x00\x00\x00", "call", "0x2000"),
        disasm.Insn(0x1005, 1, b"\x90", "nop", ""),
    ]
    syms = {0x1000: "f", 0x1005: "f+0x5", 0x2000: "tick"}
    lines = [line.plain for line in context.code_lines(insns, 0x1005, {0x1000: 2}, syms.get)]
    assert lines == [
        "   *2  0x1000 <f>:  call 0x2000 <tick>",
        "=>     0x1005 <f+0x5>:  nop",
    ]


@pytest.mark.parametrize(
    ("op_str", "ref"),
    [
        ("qword ptr [rbx*8 - 0x7fef1fe0], rax", 0xFFFFFFFF8010E020),  # longmode's result[rbx]
        ("rax, qword ptr [rip + 0x10]", 0x1000 + 7 + 0x10),
        ("eax, dword ptr [0x101040]", 0x101040),
        ("dword ptr [ecx*4 + 0x101040], eax", 0x101040),
        ("qword ptr [rbp - 8], rdi", None),
        ("rax, [rdi + 1]", None),
        ("rdi, rax", None),
    ],
)
def test_memory_operand_references(op_str: str, ref: int | None) -> None:
    assert disasm.Insn(0x1000, 7, b"", "mov", op_str).memory_ref() == ref


def test_code_lines_name_memory_operands() -> None:
    insn = disasm.Insn(0x1000, 8, b"", "mov", "qword ptr [rbx*8 - 0x7fef1fe0], rax")
    syms = {0xFFFFFFFF8010E020: "result"}
    (line,) = context.code_lines([insn], None, {}, syms.get)
    assert line.plain.endswith(
        "mov qword ptr [rbx*8 - 0x7fef1fe0], rax  # 0xffffffff8010e020 <result>"
    )
