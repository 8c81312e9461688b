"""The REPL's commands against the emulated test guests, in-process (no terminal).

Each test drives real guests through the command registry exactly as a user's lines
would, and checks the printed output against the guests' documented behaviour
(tests/guests/README.md) and their ELF symbols.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from rich.console import Console

from elfsyms import symbols
from xendbg.engine.stops import StopReason
from xendbg.errors import XendbgError
from xendbg.frontend.repl import Debugger, execute
from xendbg.frontend.repl.disasm import disassemble
from xendbg.frontend.repl.expr import ExprError
from xendbg.frontend.repl.registry import CommandError
from xendbg.frontend.repl.target import EmuTarget

RUN = "continue -t 10"  # every continue below has a stop it must reach well within this


def code_of(elf: Path, section: str) -> tuple[int, bytes]:
    with elf.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(section)
        return sec["sh_addr"], sec.data()


class Repl:
    def __init__(self, elf: Path, vcpus: int = 1) -> None:
        self.buf = io.StringIO()
        console = Console(file=self.buf, color_system=None, force_terminal=False,
                          no_color=True, width=120)  # fmt: skip
        self.target = EmuTarget(str(elf), vcpus=vcpus)
        self.dbg = Debugger(console, target=self.target)
        self.dbg.symbols.load(str(elf))
        self.dbg.attach()

    def __call__(self, *lines: str) -> str:
        self.buf.seek(0)
        self.buf.truncate()
        for line in lines:
            execute(self.dbg, line)
        return self.buf.getvalue()

    def value(self, expr: str) -> int:
        out = self(f"print {expr}").strip()
        assert re.fullmatch(r"0x[0-9a-f]+", out), out
        return int(out, 16)


@pytest.fixture
def fresh(guests: Path) -> Iterator[Repl]:
    """longmode.elf just attached: at _start, higher half not mapped yet."""
    r = Repl(guests / "longmode.elf")
    try:
        yield r
    finally:
        r.dbg.close()


@pytest.fixture
def longmode(fresh: Repl) -> Repl:
    """longmode.elf stopped at main_loop: its own page tables are live."""
    out = fresh("hbreak main_loop", RUN, "delete")
    assert "Breakpoint 1, " in out
    return fresh


def test_attach_stops_at_the_entry_point(guests: Path, fresh: Repl) -> None:
    sym = symbols(guests / "longmode.elf")
    assert fresh.value("$rip") == sym["_start"]
    assert fresh("print $rip").strip() == hex(sym["_start"])
    out = fresh("info registers rip rdi")
    assert re.search(rf"^rip\s+{hex(sym['_start'])}\s+{hex(sym['_start'])} <_start>", out, re.M)
    assert re.search(r"^rdi\s+0x0\s+0$", out, re.M)
    # The higher half is mapped only once the guest has built its tables; a
    # breakpoint there is still accepted and hit.
    with pytest.raises(XendbgError, match="cannot access guest memory at 0xffffffff8010d06b"):
        fresh("x/1gx tick")
    assert fresh("breakpoint create tick").strip() == f"Breakpoint 1 at {sym['tick']:#x} <tick>"
    assert fresh(RUN).splitlines()[0] == f"Breakpoint 1, {sym['tick']:#x} <tick>"


def test_breakpoint_context_view_and_step(guests: Path, longmode: Repl) -> None:
    sym = symbols(guests / "longmode.elf")
    tick = sym["tick"]
    out = longmode("breakpoint create tick")
    assert out.strip() == f"Breakpoint 2 at {tick:#x} <tick>"
    out = longmode(RUN)
    lines = out.splitlines()
    assert lines[0] == f"Breakpoint 2, {tick:#x} <tick>"
    # Context view: registers, code with the PC and breakpoint marked, stack.
    assert any("registers" in line and "─" in line for line in lines)
    assert any(line.startswith(f"=> *2  {tick:#x} <tick>:") for line in lines)
    assert re.search(rf"^rip    {tick:#018x} <tick>$", out, re.M)
    ret = longmode.value("*$rsp")
    assert sym["main_loop"] <= ret < sym["main_loop"] + 0x57  # called from main_loop
    assert re.search(rf"^{longmode.value('$rsp'):#x} \+0x00: {ret:#018x} <main_loop\+0x[0-9a-f]+>"
                     r"  ← sp", out, re.M)  # fmt: skip
    # tick(rdi = vCPU index).
    assert longmode.value("$rdi") == 0
    # One instruction: the PC moves by that instruction's length.
    base, text = code_of(guests / "longmode.elf", ".text")
    first = disassemble(text[tick - base :], tick, 64, 2)
    out = longmode("step")
    assert out.splitlines()[0] == f"{first[1].addr:#x} <tick+{first[0].size:#x}>"
    assert longmode.value("$rip") == first[1].addr
    assert longmode("breakpoint list").split()[:3] == ["2", "breakpoint", "sw"]
    # The breakpoint is hit again on the next pass; its hit count shows it.
    longmode(RUN)
    assert "hits 2" in longmode("info breakpoints")


def test_registers_variables_and_memory(guests: Path, longmode: Repl) -> None:
    sym = symbols(guests / "longmode.elf")
    longmode("b tick", RUN)
    longmode("set $rax = 0x1122334455667788")
    assert longmode.value("$rax") == 0x1122334455667788
    assert longmode.value("$eax") == 0x55667788
    longmode("set $ah = 0xff")
    assert longmode.value("$rax") == 0x112233445566FF88
    assert longmode("print -f d 0 - $al").strip() == "-136"
    assert longmode("p/b 5").strip() == "0b101"
    # User variables.
    longmode("set $n = (2 + 5) * 3")
    assert longmode("print/d $n").strip() == "21"
    longmode("unset $n")
    with pytest.raises(ExprError, match=r"no register or variable \$n"):
        longmode("print $n")
    # Memory: counter[0] counts passes, watched[0] = counter * 3 (written after tick).
    out = longmode("examine -w g -n 4 &counter")
    row = out.splitlines()[0]
    assert row.startswith(f"{sym['counter']:#x} <counter>:  ")
    first = int(row.split()[2], 16)
    assert first == longmode.value("*counter")
    assert longmode("x/4gx &counter") == out
    longmode("set *&counter = 0x41")
    assert longmode.value("*counter") == 0x41
    assert longmode("x/1cb &counter").split()[-2:] == ["65", "'A'"]
    # The higher-half data page (4 KiB mapping built by the guest).
    out = longmode("x/16cb &hh_data")
    assert "'H'" in out and "'I'" in out
    with pytest.raises(XendbgError, match="cannot access guest memory at 0x1000000000"):
        longmode("x/2gx 0x1000000000")


def test_watchpoint_reports_old_and_new_values(guests: Path, longmode: Repl) -> None:
    sym = symbols(guests / "longmode.elf")
    out = longmode("watchpoint create watched 8 w")
    assert out.strip() == f"Watchpoint 2 (write) at {sym['watched']:#x} <watched>, 8 byte(s)"
    before = longmode.value("*watched")
    out = longmode(RUN)
    m = re.search(r"^Watchpoint 2 \(write\): watched\nOld value = (0x[0-9a-f]+)\n"
                  r"New value = (0x[0-9a-f]+)$", out, re.M)  # fmt: skip
    assert m, out
    assert int(m.group(1), 16) == before
    assert int(m.group(2), 16) == longmode.value("*counter") * 3
    assert longmode.value("*watched - *counter * 3") == 0
    assert "watchpoint w" in longmode("watchpoint list")
    longmode("watchpoint delete all")
    assert longmode("watchpoint list").strip() == "No watchpoints."


def test_disassemble_marks_pc_and_breakpoints_and_next_steps_over_calls(
    guests: Path, longmode: Repl
) -> None:
    sym = symbols(guests / "longmode.elf")
    base, text = code_of(guests / "longmode.elf", ".text")
    main = sym["main_loop"]
    insns = disassemble(text[main - base :], main, 64, 30)
    call = next(i for i in insns if i.mnemonic == "call")
    longmode(f"b {call.addr:#x}", RUN)
    assert longmode.value("$rip") == call.addr
    out = longmode("disassemble main_loop 30")
    marked = [line for line in out.splitlines() if line.startswith("=>")]
    assert marked == [
        f"=> *2  {call.addr:#x} <main_loop+{call.addr - main:#x}>:  "
        f"{call.text} <{'tick' if int(call.op_str, 16) == sym['tick'] else ''}>"
    ]
    assert len(out.splitlines()) == 30
    counter = longmode.value("*counter")
    out = longmode("next")
    assert longmode.value("$rip") == call.end
    assert longmode.value("*counter") == counter + 1  # tick ran
    assert longmode("info breakpoints").count("\n") == 1  # no temporary breakpoint left
    out = longmode("x/3i $rip")
    assert out.splitlines()[0].startswith(f"=>     {call.end:#x} <main_loop+")


def test_ctrl_c_interrupts_continue(longmode: Repl) -> None:
    s = longmode.dbg.session
    timer = threading.Timer(0.3, s.interrupt)  # what the REPL's SIGINT handler does
    timer.start()
    try:
        out = longmode("continue -t 10")
    finally:
        timer.cancel()
    assert out.startswith("Interrupted at 0x")
    assert s.stop.reason is StopReason.INTERRUPT
    assert not s.running


def test_guest_commands_and_detach_restores_memory(guests: Path, longmode: Repl) -> None:
    sym = symbols(guests / "longmode.elf")
    dom = longmode.target.dom
    out = longmode("guest list")
    assert re.search(rf"^\* {dom.domid}\s+{re.escape(dom.name)}\s+emu\s+1\s+64\s+paused "
                     r"\(attached\)$", out, re.M)  # fmt: skip
    out = longmode("info xen")
    assert out.startswith("No Xen hypervisor: this is xendbg's emulated backend (Unicorn)")
    assert "longmode.elf" in out
    assert "emu, 64-bit" in longmode("info guest")
    longmode("b tick", RUN)
    tick_phys = longmode.dbg.session.translate(0, sym["tick"])
    base, text = code_of(guests / "longmode.elf", ".text")
    original = text[sym["tick"] - base : sym["tick"] - base + 4]
    assert dom.read_phys(tick_phys, 4) != original  # our int3 is planted
    assert longmode("x/4xb tick").split()[2:] == [f"{b:#04x}" for b in original]  # hidden
    out = longmode("guest detach")
    assert "1 breakpoint(s)/watchpoint(s) removed" in out
    assert not dom.paused
    assert dom.read_phys(tick_phys, 4) == original
    assert "running" in longmode("guest list")
    with pytest.raises(CommandError, match="not attached"):
        longmode("print $rip")
    longmode("guest attach")
    assert longmode("breakpoint list").strip() == "No breakpoints."
    assert longmode.dbg.session.stop.reason is StopReason.ATTACH


def test_guest_unpause_and_pause(longmode: Repl) -> None:
    assert longmode("guest unpause").strip() == "The guest runs (`guest pause` to stop it)."
    with pytest.raises(XendbgError, match="the guest is running"):
        longmode("print $rip")
    assert "state      running" in longmode("info guest")
    assert longmode("guest pause").startswith("Interrupted at 0x")
    with pytest.raises(CommandError, match="already paused"):
        longmode("guest pause")
    assert longmode.value("$rip") == longmode.dbg.session.stop.pc


def test_symbol_commands(guests: Path, longmode: Repl) -> None:
    sym = symbols(guests / "longmode.elf")
    out = longmode("symbol list comp")
    assert re.search(rf"^{sym['compute']:#018x}\s+\d+ func\s+global compute$", out, re.M)
    longmode("symbol clear")
    with pytest.raises(ExprError, match="no symbol 'tick'"):
        longmode("print tick")
    longmode(f"symbol load {guests / 'longmode.elf'} 0x10")
    assert longmode.value("&tick") == sym["tick"] + 0x10
    assert longmode("info symbol tick + 3").strip() == f"tick+0x3 ({sym['tick'] + 0x13:#x})"


def test_errors_are_clear(longmode: Repl) -> None:
    with pytest.raises(ExprError) as info:
        longmode("print 1 + (2 * nosuch)")
    assert str(info.value).splitlines()[1:] == ["  1 + (2 * nosuch)", "           ^^^^^^"]
    with pytest.raises(CommandError, match="kind must be r, w or a"):
        longmode("watchpoint create counter 8 x")
    with pytest.raises(CommandError, match="no breakpoint 9"):
        longmode("breakpoint delete 9")
    with pytest.raises(CommandError, match="no vCPU 3"):
        longmode("cpu set 3")
    with pytest.raises(CommandError, match="unknown command"):
        longmode("frobnicate")


def test_vcpus_are_selectable(guests: Path) -> None:
    r = Repl(guests / "smp.elf", vcpus=2)
    try:
        sym = symbols(guests / "smp.elf")
        assert r.value("$rdi") == 0
        out = r("cpu get")
        assert out.splitlines()[0] == "current vCPU: 0"
        assert f"* vCPU 0  {sym['_start']:#x} <_start>" in out
        r("cpu set 1")
        assert r.value("$rdi") == 1  # each vCPU starts with RDI = its index
        r("b spin_1", RUN)
        assert r.dbg.session.current_vcpu == 1
        assert r.value("$rip") == sym["spin_1"]
    finally:
        r.dbg.close()


def test_i386_guest_uses_32_bit_names(guests: Path) -> None:
    r = Repl(guests / "i386.elf")
    try:
        sym = symbols(guests / "i386.elf")
        out = r("info registers")
        names = [line.split()[0] for line in out.splitlines()]
        assert names[:9] == ["eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip"]
        assert "rax" not in names
        r("b tick", RUN)
        assert r.value("$eip") == sym["tick"]
        out = r("context")
        assert re.search(rf"^eip    {sym['tick']:#010x} <tick>$", out, re.M)
        assert re.search(r"^eflags 0x[0-9a-f]{8} \[ [A-Z ]*\]$", out, re.M)
        # cdecl: tick(index) takes its argument on the stack, above the return address.
        assert r.value("*($esp + 4)") == 0
        assert r("print -1").strip() == "0xffffffff"
        out = r("x/2wx &counter")
        assert out.startswith(f"{sym['counter']:#x} <counter>:  0x")
    finally:
        r.dbg.close()
