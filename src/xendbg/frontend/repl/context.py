"""The context view shown after every stop: registers, code around the PC, stack.

Pure rendering: the caller supplies register values, decoded instructions and
stack words; this module turns them into rich ``Text`` lines (styles vanish
when colour is off, so the same lines serve terminals and scripts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from rich.text import Text

from xendbg.frontend.repl.disasm import Insn
from xendbg.frontend.repl.regs import RegisterNames, flag_names

Describe = Callable[[int], str | None]

CHANGED = "bold red"
PC_STYLE = "bold green"
ADDR_STYLE = "cyan"
SYMBOL_STYLE = "yellow"
BREAK_STYLE = "bold magenta"


def _sym(addr: int, describe: Describe) -> str:
    name = describe(addr)
    return f" <{name}>" if name else ""


def register_lines(
    names: RegisterNames,
    regs: Mapping[str, int],
    previous: Mapping[str, int] | None,
    describe: Describe,
    per_row: int = 3,
) -> list[Text]:
    """GPRs three to a row, then the PC, flags, segments and control registers;
    registers that differ from ``previous`` are highlighted."""
    hexw = names.word_size * 2

    def changed(src: str) -> bool:
        return previous is not None and previous.get(src) != regs.get(src)

    def cell(src: str, width: int) -> Text:
        label = names.display_name(src)
        value = regs.get(src)
        t = Text(f"{label:<6} ")
        if value is None:
            t.append("<unavailable>".ljust(width + 2))
        else:
            t.append(f"{value:#0{width + 2}x}", style=CHANGED if changed(src) else None)
        return t

    general = names.general()
    gprs = [r for r in general[: general.index("rip")] if r in regs]
    lines: list[Text] = []
    for i in range(0, len(gprs), per_row):
        row = Text()
        for src in gprs[i : i + per_row]:
            if row:
                row.append("  ")
            row.append_text(cell(src, hexw))
        lines.append(row)
    if "rip" in regs:
        row = cell("rip", hexw)
        row.append(_sym(regs["rip"], describe), style=SYMBOL_STYLE)
        lines.append(row)
    if "rflags" in regs:
        row = cell("rflags", 8)
        row.append(" " + flag_names(regs["rflags"]))
        lines.append(row)
    for group, width in (
        (("cs", "ss", "ds", "es", "fs", "gs"), 4),
        (("fs_base", "gs_base"), hexw),
        (("cr0", "cr2", "cr3", "cr4", "efer"), 8),
    ):
        row = Text()
        for src in group:
            if src not in regs:
                continue
            label = names.display_name(src)
            if row:
                row.append("  ")
            row.append(f"{label} ")
            row.append(f"{regs[src]:#0{width + 2}x}", style=CHANGED if changed(src) else None)
        if row:
            lines.append(row)
    return lines


def code_lines(
    insns: Sequence[Insn], pc: int | None, breakpoints: Mapping[int, int], describe: Describe
) -> list[Text]:
    """``=> 0xADDR <sym+off>:  mnemonic operands`` lines; ``=>`` marks the PC and
    ``*N`` breakpoint N.  Direct branch targets get their symbol name."""
    lines: list[Text] = []
    for insn in insns:
        t = Text()
        is_pc = insn.addr == pc
        t.append("=> " if is_pc else "   ", style=PC_STYLE if is_pc else None)
        bp = breakpoints.get(insn.addr)
        t.append(f"*{bp:<3}" if bp is not None else "    ", style=BREAK_STYLE)
        t.append(f"{insn.addr:#x}", style=PC_STYLE if is_pc else ADDR_STYLE)
        t.append(_sym(insn.addr, describe) + ":", style=SYMBOL_STYLE)
        t.append(f"  {insn.text}", style="bold" if is_pc else None)
        target = insn.branch_target()
        if target is not None and (name := describe(target)):
            t.append(f" <{name}>", style=SYMBOL_STYLE)
        elif (ref := insn.memory_ref()) is not None and (name := describe(ref)):
            t.append(f"  # {ref:#x} <{name}>", style=SYMBOL_STYLE)
        lines.append(t)
    return lines


def stack_lines(
    sp: int, words: Iterable[int], word_size: int, describe: Describe, fp: int | None = None
) -> list[Text]:
    lines: list[Text] = []
    for i, value in enumerate(words):
        addr = sp + i * word_size
        t = Text()
        t.append(f"{addr:#x}", style=ADDR_STYLE)
        t.append(f" +{i * word_size:#04x}: ")
        t.append(f"{value:#0{word_size * 2 + 2}x}")
        name = describe(value)
        if name:
            t.append(f" <{name}>", style=SYMBOL_STYLE)
        marks = (["sp"] if i == 0 else []) + (["fp"] if addr == fp else [])
        if marks:
            t.append("  ← " + ",".join(marks))
        lines.append(t)
    return lines
