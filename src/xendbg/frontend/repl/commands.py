"""Every REPL command: argument parsing and output; the work is in debugger.py.

Commands follow the original xendbg REPL (``breakpoint create``, ``examine -w g``)
and take GDB's short forms as aliases (``b``, ``c``, ``si``, ``x/4gx``, ``p/x``,
``info r``, ``disas``).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from rich.text import Text

from xendbg.backend.base import Capability
from xendbg.engine.stops import WatchKind
from xendbg.errors import GuestMemoryFault, XendbgError
from xendbg.frontend.repl import context, disasm
from xendbg.frontend.repl.debugger import WATCH_LETTER, WATCH_NAME, Debugger
from xendbg.frontend.repl.expr import ExprError, parses
from xendbg.frontend.repl.fmt import UNITS, examine_rows, format_value, parse_slash_format
from xendbg.frontend.repl.registry import EXPR, FILE, REG, VAR, CommandError, Registry
from xendbg.frontend.repl.regs import flag_names
from xendbg.frontend.repl.target import xen_info_for

REGISTRY = Registry()
command = REGISTRY.command

REGISTRY.group("guest", "list, attach to, detach from, pause and unpause guests")
REGISTRY.group("info", "show information about the guest and the debugger")
REGISTRY.group("cpu", "show or select the current vCPU")
REGISTRY.group("breakpoint", "execution breakpoints")
REGISTRY.group("watchpoint", "data watchpoints")
REGISTRY.group("symbol", "ELF symbols")

FORMAT_CHOICES = ("x", "d", "u", "o", "b", "t", "c")
KIND_CHOICES = ("r", "w", "a")
PLURAL = {WatchKind.WRITE: "writes", WatchKind.READ: "reads", WatchKind.ACCESS: "accesses"}
KINDS = {"r": WatchKind.READ, "w": WatchKind.WRITE, "a": WatchKind.ACCESS}

DISASSEMBLE_COUNT = 10
EXAMINE_MAX = 1 << 16


# -- argument helpers -----------------------------------------------------------------


def parse_options(
    args: str, spec: Mapping[str, tuple[str, ...] | None]
) -> tuple[dict[str, str], str]:
    """Leading ``-o VALUE`` / ``-oVALUE`` / ``-flag`` options, then the rest of the line.
    A ``-`` followed by a digit, ``$`` or ``(`` starts an expression, not an option."""
    opts: dict[str, str] = {}
    rest = args.strip()
    while rest.startswith("-"):
        word, _, tail = rest.partition(" ")
        tail = tail.strip()
        if word == "--":
            rest = tail
            break
        if not word[1:2].isalpha():
            break
        name, attached = word[:2], word[2:]
        if name not in spec:
            raise CommandError(f"unknown option {word} (options: {', '.join(spec) or 'none'})")
        choices = spec[name]
        if choices is None:
            if attached:
                raise CommandError(f"option {name} takes no value")
            opts[name] = ""
            rest = tail
            continue
        if attached:
            value = attached
        else:
            value, _, tail = tail.partition(" ")
            tail = tail.strip()
            if not value:
                raise CommandError(f"option {name} needs a value")
        if choices and value not in choices:
            raise CommandError(f"option {name}: {value!r} is not one of {', '.join(choices)}")
        opts[name] = value
        rest = tail
    return opts, rest


def need(text: str, what: str, usage: str) -> str:
    if not text.strip():
        raise CommandError(f"{what} expected: {usage}")
    return text.strip()


def parse_count(text: str, what: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise CommandError(f"{what} must be a number, not {text!r}") from None
    if n <= 0:
        raise CommandError(f"{what} must be positive")
    return n


def split_trailing_count(text: str) -> tuple[str, str | None]:
    """``EXPR [N]``: the last word is a count if what precedes it still parses."""
    parts = text.rsplit(None, 1)
    if len(parts) == 2 and parts[1].isdigit() and parses(parts[0]):
        return parts[0], parts[1]
    return text, None


def print_lines(dbg: Debugger, lines: list[str] | str) -> None:
    text = lines if isinstance(lines, str) else "\n".join(lines)
    dbg.out.print(Text(text), highlight=False)


def where(dbg: Debugger, addr: int) -> str:
    name = dbg.describe(addr)
    return f"{addr:#x}" + (f" <{name}>" if name else "")


# -- guest ------------------------------------------------------------------------------


@command("guest list", usage="guest list", summary="list the guests this target offers")
def guest_list(dbg: Debugger, args: str) -> None:
    if dbg.target is None:
        d = dbg.session.domain
        print_lines(dbg, f"* {d.domid:<4} {d.name}  ({d.guest_type}, {d.vcpu_count} vCPU(s))")
        return
    current = dbg.session.domain.domid if dbg.attached else None
    lines = [f"  {'ID':<5} {'NAME':<20} {'TYPE':<5} {'VCPUS':<6} {'BITS':<5} STATE"]
    for g in dbg.target.guests():
        mark = "*" if g.domid == current else " "
        state = g.state + (" (attached)" if g.domid == current else "")
        lines.append(
            f"{mark} {g.domid:<5} {g.name:<20} {g.guest_type:<5} {g.vcpus:<6} "
            f"{g.word_size * 8:<5} {state}"
        )
    print_lines(dbg, lines)


@command(
    "guest attach",
    usage="guest attach [DOMAIN]",
    args=("word",),
    monitor=False,
    summary="attach to a guest (pauses it)",
)
def guest_attach(dbg: Debugger, args: str) -> None:
    s = dbg.attach(args.strip() or None)
    d = s.domain
    print_lines(dbg, f"Attached to domain {d.domid} ({d.name}); the guest is paused.")
    dbg.after_stop(s.stop)


@command(
    "guest detach",
    usage="guest detach",
    monitor=False,
    summary="detach: remove breakpoints and watchpoints, let the guest run",
)
def guest_detach(dbg: Debugger, args: str) -> None:
    if not dbg.attached:
        raise CommandError("not attached")
    d = dbg.session.domain
    n = len(dbg.breakpoints) + len(dbg.watchpoints)
    dbg.detach()
    print_lines(
        dbg,
        f"Detached from domain {d.domid} ({d.name}): {n} breakpoint(s)/"
        "watchpoint(s) removed, the guest runs.",
    )


@command(
    "guest pause",
    usage="guest pause",
    monitor=False,
    summary="stop a guest running in the background",
)
def guest_pause(dbg: Debugger, args: str) -> None:
    dbg.pause()


@command(
    "guest unpause",
    usage="guest unpause",
    monitor=False,
    summary="let the guest run in the background (`guest pause` stops it)",
)
def guest_unpause(dbg: Debugger, args: str) -> None:
    if dbg.session.running:
        raise CommandError("the guest is already running")
    dbg.unpause()
    print_lines(dbg, "The guest runs (`guest pause` to stop it).")


# -- info -------------------------------------------------------------------------------


@command("info guest", usage="info guest", summary="the attached guest: type, vCPUs, state")
def info_guest(dbg: Debugger, args: str) -> None:
    s = dbg.session
    d = s.domain
    caps = [c.name.lower() for c in Capability if c in s.caps and c.name]
    state = "running" if s.running else f"stopped ({s.stop.reason.value})"
    lines = [
        f"domain     {d.domid} ({d.name})",
        f"type       {d.guest_type}, {d.word_size * 8}-bit",
        f"vCPUs      {d.vcpu_count} (current: {s.current_vcpu})",
        f"state      {state}",
        f"backend    {', '.join(caps)}",
        f"symbols    {len(dbg.symbols)} from "
        + (", ".join(p for p, _ in dbg.symbols.files) or "nothing"),
    ]
    print_lines(dbg, lines)


@command("info xen", usage="info xen", summary="the hypervisor (or the emulator) underneath")
def info_xen(dbg: Debugger, args: str) -> None:
    if dbg.target is not None:
        print_lines(dbg, dbg.target.xen_info())
    else:
        print_lines(dbg, xen_info_for(dbg.session.domain))


@command(
    "info registers",
    usage="info registers [all | REG...]",
    aliases=("info r", "i r"),
    args=(REG,),
    summary="register values of the current vCPU",
    details="With names (with or without '$'), only those; `all` lists every register "
    "the backend reports.",
)
def info_registers(dbg: Debugger, args: str) -> None:
    regs = dbg.registers()
    names = dbg.names
    wanted = args.replace("$", " ").split()
    lines: list[str] = []
    if not wanted:
        sources = [r for r in names.general() if r in regs]
        items = [(names.display_name(r), regs[r], r) for r in sources]
    elif wanted == ["all"]:
        items = [(names.display_name(r), v, r) for r, v in regs.items()]
    else:
        items = []
        for name in wanted:
            value = names.read(regs, name)
            f = names.field(name)
            if value is None or f is None:
                raise CommandError(f"no register {name!r}")
            items.append((name, value, f.source if f.shift == 0 and f.bits >= 32 else ""))
    for label, value, src in items:
        natural = str(value)
        if src == "rip" or src in ("rsp", "rbp"):
            natural = where(dbg, value)
        elif src == "rflags":
            natural = flag_names(value)
        lines.append(f"{label:<10} {value:<#20x} {natural}")
    print_lines(dbg, lines)


@command(
    "info breakpoints",
    usage="info breakpoints",
    aliases=("info b", "info watchpoints"),
    summary="list breakpoints and watchpoints",
)
def info_breakpoints(dbg: Debugger, args: str) -> None:
    lines = _breakpoint_rows(dbg) + _watchpoint_rows(dbg)
    print_lines(dbg, lines or ["No breakpoints or watchpoints."])


@command(
    "info symbol",
    usage="info symbol EXPR",
    args=(EXPR,),
    summary="the symbol an address belongs to",
)
def info_symbol(dbg: Debugger, args: str) -> None:
    addr = dbg.eval_addr(need(args, "an address", "info symbol EXPR"))
    name = dbg.describe(addr)
    print_lines(dbg, f"{name} ({addr:#x})" if name else f"No symbol matches {addr:#x}.")


# -- vCPUs --------------------------------------------------------------------------------


@command(
    "cpu get",
    usage="cpu get",
    aliases=("info vcpus", "info threads"),
    summary="the current vCPU and where every vCPU is",
)
def cpu_get(dbg: Debugger, args: str) -> None:
    s = dbg.session
    lines = [f"current vCPU: {s.current_vcpu}"]
    if not s.running:
        for v in s.vcpus:
            mark = "*" if v == s.current_vcpu else " "
            lines.append(f"{mark} vCPU {v}  {where(dbg, s.pc(v))}")
    print_lines(dbg, lines)


@command(
    "cpu set",
    usage="cpu set N",
    args=("word",),
    summary="select the vCPU that registers, memory and stepping refer to",
)
def cpu_set(dbg: Debugger, args: str) -> None:
    s = dbg.session
    text = need(args, "a vCPU number", "cpu set N")
    try:
        v = int(text, 0)
    except ValueError:
        raise CommandError(f"vCPU number expected, not {text!r}") from None
    if v not in s.vcpus:
        raise CommandError(f"no vCPU {v} (the guest has {len(s.vcpus)}: 0-{len(s.vcpus) - 1})")
    s.current_vcpu = v
    print_lines(dbg, f"current vCPU: {v}  {where(dbg, s.pc(v))}")


# -- expressions and variables ----------------------------------------------------------------


@command(
    "print",
    usage="print [-f x|d|u|o|b|c] EXPR",
    aliases=("p", "output"),
    options={"-f": FORMAT_CHOICES},
    args=(EXPR,),
    summary="evaluate an expression (hex by default)",
    details="EXPR: numbers (0x hex, decimal), + - * / % << >> & | ^ ~, parentheses, "
    "$registers, $variables, symbols (`main_loop`, `&counter`) and *ADDR "
    "(one guest word).  GDB's p/x form works too.",
)
def print_cmd(dbg: Debugger, args: str) -> None:
    fmt = "x"
    text = args.strip()
    if text.startswith("/"):
        spec, _, text = text[1:].partition(" ")
        letters = [c for c in spec if c in FORMAT_CHOICES]
        if not letters or len(letters) != len(spec):
            raise CommandError(f"bad /FORMAT {spec!r}: one of {''.join(FORMAT_CHOICES)}")
        fmt = letters[-1]
    else:
        opts, text = parse_options(text, {"-f": FORMAT_CHOICES})
        fmt = opts.get("-f", fmt)
    value = dbg.eval(need(text, "an expression", "print [-f FMT] EXPR"))
    bits = dbg.word_size * 8 if dbg.attached else 64
    if value >= 1 << bits or value < -(1 << (bits - 1)):
        bits = 64 if value < 1 << 64 else max(64, value.bit_length())
    print_lines(dbg, format_value(value, fmt, bits))


@command(
    "set",
    usage="set $VAR = EXPR | set $REG = EXPR | set *ADDR = EXPR",
    args=(VAR, "word", EXPR),
    summary="set a variable, a register or a guest word",
    details="`$name` is a register if the guest has one by that name (including "
    "$eax, $ax, $al … sub-registers), otherwise a user variable.  `*ADDR` "
    "writes one guest word.",
)
def set_cmd(dbg: Debugger, args: str) -> None:
    text = args.strip().removeprefix("var ").strip()
    left, eq, right = text.partition("=")
    usage = "set $VAR = EXPR"
    if not eq or not right.strip():
        raise CommandError(f"'=' and a value expected: {usage}")
    left = left.strip()
    value = dbg.eval(right.strip())
    if left.startswith("$"):
        name = left[1:]
        if not name.replace("_", "a").isalnum():
            raise CommandError(f"bad variable name {left!r}")
        if dbg.attached and dbg.names.field(name) is not None:
            dbg.set_register(name, value)
        else:
            dbg.variables[name] = value
        return
    if left.startswith("*"):
        addr = dbg.eval_addr(left[1:])
        ws = dbg.word_size
        dbg.session.write_memory(
            dbg.vcpu, addr, (value & ((1 << (ws * 8)) - 1)).to_bytes(ws, "little")
        )
        return
    raise CommandError(f"cannot assign to {left!r}: {usage}, set $REG = EXPR or set *ADDR = EXPR")


@command("unset", usage="unset $VAR", args=(VAR,), summary="forget a user variable")
def unset_cmd(dbg: Debugger, args: str) -> None:
    names = need(args, "a variable", "unset $VAR").split()
    for n in names:
        key = n.removeprefix("$")
        if key not in dbg.variables:
            raise CommandError(f"no variable ${key}")
        del dbg.variables[key]


# -- memory -----------------------------------------------------------------------------------


@command(
    "examine",
    usage="examine [-w b|h|w|g] [-n N] [-f FMT] EXPR",
    aliases=("x",),
    options={"-w": tuple(UNITS), "-n": (), "-f": FORMAT_CHOICES},
    args=(EXPR,),
    summary="dump guest memory at an address (guest-virtual, current vCPU)",
    details="-w: unit (byte, halfword, word, giant; default: the guest's word), -n: "
    "how many (default 1 row), -f: format (default x).  GDB's x/NFU works: "
    "x/4gx $rsp.",
)
def examine(dbg: Debugger, args: str) -> None:
    text = args.strip()
    count = fmt = unit = None
    if text.startswith("/"):
        spec, _, text = text[1:].partition(" ")
        if spec.endswith("i"):  # x/Ni: GDB's way to disassemble
            n = spec[:-1]
            disassemble(dbg, f"{text} {n}" if n else text)
            return
        count, fmt, unit = parse_slash_format(spec)
    else:
        opts, text = parse_options(text, {"-w": tuple(UNITS), "-n": (), "-f": FORMAT_CHOICES})
        if "-w" in opts:
            unit = UNITS[opts["-w"]]
        if "-n" in opts:
            count = parse_count(opts["-n"], "-n")
        fmt = opts.get("-f")
    unit = unit or dbg.word_size
    fmt = fmt or "x"
    if fmt == "c":
        unit = 1
    count = count or 1
    addr = dbg.eval_addr(need(text, "an address", "examine [-w W] [-n N] EXPR"))
    size = count * unit
    if size > EXAMINE_MAX:
        raise CommandError(f"at most {EXAMINE_MAX} bytes at once")
    try:
        data = dbg.session.read_memory(dbg.vcpu, addr, size)
        fault = None
    except GuestMemoryFault as e:
        data = dbg.read_partial(addr, size)
        data = data[: len(data) - len(data) % unit]
        fault = e
    print_lines(dbg, examine_rows(data, addr, unit, fmt, dbg.describe))
    if fault is not None:
        raise fault


@command(
    "disassemble",
    usage="disassemble [EXPR [N]]",
    aliases=("disas",),
    args=(EXPR,),
    summary="disassemble N instructions (default 10) at EXPR (default: the PC)",
    details="Intel syntax (capstone).  `=>` marks the PC, `*N` breakpoint N.",
)
def disassemble(dbg: Debugger, args: str) -> None:
    text, count_text = split_trailing_count(args.strip())
    count = parse_count(count_text, "N") if count_text else DISASSEMBLE_COUNT
    pc = dbg.pc()
    addr = dbg.eval_addr(text) if text else pc
    code = dbg.read_partial(addr, 16 * count)
    if not code:
        raise GuestMemoryFault(addr)
    insns = disasm.disassemble(code, addr, dbg.bits, count)
    if not insns:
        raise XendbgError(f"cannot decode an instruction at {addr:#x}")
    for line in context.code_lines(insns, pc, dbg.breakpoint_marks(), dbg.describe):
        dbg.out.print(line, highlight=False)


# -- breakpoints and watchpoints -------------------------------------------------------------


def _breakpoint_rows(dbg: Debugger) -> list[str]:
    rows = []
    for bp in sorted(dbg.breakpoints.values(), key=lambda b: b.id):
        if bp.temporary:
            continue
        kind = "hw" if bp.hardware else "sw"
        rows.append(
            f"{bp.id:<4} breakpoint {kind}  {where(dbg, bp.addr)}  hits {bp.hits}  ({bp.expr})"
        )
    return rows


def _watchpoint_rows(dbg: Debugger) -> list[str]:
    rows = []
    for wp in sorted(dbg.watchpoints.values(), key=lambda w: w.id):
        rows.append(
            f"{wp.id:<4} watchpoint {WATCH_LETTER[wp.kind]}  {where(dbg, wp.addr)} "
            f"len {wp.length}  hits {wp.hits}  ({wp.expr})"
        )
    return rows


@command(
    "breakpoint create",
    usage="breakpoint create [-h] EXPR",
    aliases=("b", "break", "br"),
    options={"-h": None},
    args=(EXPR,),
    summary="stop when a vCPU executes the instruction at EXPR",
    details="-h uses a debug register (hardware breakpoint) instead of an int3.",
)
def breakpoint_create(dbg: Debugger, args: str) -> None:
    opts, text = parse_options(args, {"-h": None})
    text = need(text, "an address", "breakpoint create EXPR")
    addr = dbg.eval_addr(
        text.removeprefix("*").strip() if text.startswith("*") and parses(text[1:]) else text
    )
    bp = dbg.add_breakpoint(addr, text, hardware="-h" in opts)
    kind = "Hardware breakpoint" if bp.hardware else "Breakpoint"
    print_lines(dbg, f"{kind} {bp.id} at {where(dbg, addr)}")


@command(
    "hbreak",
    usage="hbreak EXPR",
    args=(EXPR,),
    summary="hardware breakpoint (breakpoint create -h)",
)
def hbreak(dbg: Debugger, args: str) -> None:
    breakpoint_create(dbg, "-h " + args)


@command(
    "breakpoint delete",
    usage="breakpoint delete ID|all",
    args=(("all",),),
    summary="delete a breakpoint (or all of them)",
)
def breakpoint_delete(dbg: Debugger, args: str) -> None:
    text = need(args, "a breakpoint number or `all`", "breakpoint delete ID|all")
    if text == "all":
        for bp_id in list(dbg.breakpoints):
            dbg.delete_breakpoint(bp_id)
        return
    for word in text.split():
        dbg.delete_breakpoint(parse_count(word, "breakpoint number"))


@command("breakpoint list", usage="breakpoint list", summary="list breakpoints")
def breakpoint_list(dbg: Debugger, args: str) -> None:
    print_lines(dbg, _breakpoint_rows(dbg) or ["No breakpoints."])


@command(
    "watchpoint create",
    usage="watchpoint create EXPR LEN r|w|a",
    args=(EXPR, "word", KIND_CHOICES),
    summary="stop when LEN bytes at EXPR are read (r), written (w) or accessed (a)",
    details="Reported after the access, with the old and new value.",
)
def watchpoint_create(dbg: Debugger, args: str) -> None:
    usage = "watchpoint create EXPR LEN r|w|a"
    parts = args.strip().rsplit(None, 2)
    if len(parts) != 3:
        raise CommandError(f"address, length and kind expected: {usage}")
    text, length_text, kind_text = parts
    if kind_text not in KINDS:
        raise CommandError(f"kind must be r, w or a, not {kind_text!r}")
    _watch(dbg, text, length_text, KINDS[kind_text])


def _watch(dbg: Debugger, text: str, length_text: str | None, kind: WatchKind) -> None:
    addr = dbg.eval_addr(text)
    length = parse_count(length_text, "LEN") if length_text else dbg.word_size
    wp = dbg.add_watchpoint(kind, addr, length, text)
    print_lines(
        dbg, f"Watchpoint {wp.id} ({WATCH_NAME[kind]}) at {where(dbg, addr)}, {length} byte(s)"
    )


def _gdb_watch(kind: WatchKind) -> None:
    name = {WatchKind.WRITE: "watch", WatchKind.READ: "rwatch", WatchKind.ACCESS: "awatch"}[kind]

    @command(
        name,
        usage=f"{name} EXPR [LEN]",
        args=(EXPR,),
        summary=f"GDB's {name}: stop on {PLURAL[kind]} of LEN bytes (default: a word)",
    )
    def handler(dbg: Debugger, args: str) -> None:
        text, length = split_trailing_count(need(args, "an address", f"{name} EXPR [LEN]"))
        _watch(dbg, text, length, kind)


for _kind in WatchKind:
    _gdb_watch(_kind)


@command(
    "watchpoint delete",
    usage="watchpoint delete ID|all",
    args=(("all",),),
    summary="delete a watchpoint (or all of them)",
)
def watchpoint_delete(dbg: Debugger, args: str) -> None:
    text = need(args, "a watchpoint number or `all`", "watchpoint delete ID|all")
    if text == "all":
        for wp_id in list(dbg.watchpoints):
            dbg.delete_watchpoint(wp_id)
        return
    for word in text.split():
        dbg.delete_watchpoint(parse_count(word, "watchpoint number"))


@command("watchpoint list", usage="watchpoint list", summary="list watchpoints")
def watchpoint_list(dbg: Debugger, args: str) -> None:
    print_lines(dbg, _watchpoint_rows(dbg) or ["No watchpoints."])


@command(
    "delete",
    usage="delete [ID... | all]",
    aliases=("d",),
    args=(("all",),),
    summary="delete breakpoints or watchpoints by number (none given: all)",
)
def delete(dbg: Debugger, args: str) -> None:
    words = args.split()
    if not words or words == ["all"]:
        for bp_id in list(dbg.breakpoints):
            dbg.delete_breakpoint(bp_id)
        for wp_id in list(dbg.watchpoints):
            dbg.delete_watchpoint(wp_id)
        return
    for word in words:
        n = parse_count(word, "breakpoint number")
        if n in dbg.breakpoints:
            dbg.delete_breakpoint(n)
        elif n in dbg.watchpoints:
            dbg.delete_watchpoint(n)
        else:
            raise CommandError(f"no breakpoint or watchpoint {n}")


# -- run control -----------------------------------------------------------------------------


@command(
    "continue",
    usage="continue [-t SECONDS]",
    aliases=("c", "cont"),
    options={"-t": ()},
    monitor=False,
    runs_guest=True,
    summary="run every vCPU until a breakpoint, a watchpoint or Ctrl-C",
    details="-t stops the guest after SECONDS (useful in scripts).",
)
def continue_cmd(dbg: Debugger, args: str) -> None:
    opts, rest = parse_options(args, {"-t": ()})
    if rest:
        raise CommandError(f"unexpected {rest!r}: continue [-t SECONDS]")
    timeout = None
    if "-t" in opts:
        try:
            timeout = float(opts["-t"])
        except ValueError:
            raise CommandError(f"-t needs seconds, not {opts['-t']!r}") from None
    dbg.cont(timeout)


@command(
    "step",
    usage="step [N]",
    aliases=("si", "stepi", "s"),
    monitor=False,
    runs_guest=True,
    summary="execute N instructions (default 1) on the current vCPU",
    details="There are no source lines here, so GDB's `s` steps instructions too.",
)
def step(dbg: Debugger, args: str) -> None:
    dbg.step(parse_count(args.strip(), "N") if args.strip() else 1)


@command(
    "next",
    usage="next [N]",
    aliases=("ni", "nexti", "n"),
    monitor=False,
    runs_guest=True,
    summary="like step, but a call runs until it returns",
)
def next_cmd(dbg: Debugger, args: str) -> None:
    dbg.step(parse_count(args.strip(), "N") if args.strip() else 1, over_calls=True)


@command(
    "context",
    usage="context",
    aliases=("ctx",),
    summary="show registers, code and stack of the current vCPU again",
)
def context_cmd(dbg: Debugger, args: str) -> None:
    dbg.show_context()


# -- symbols ---------------------------------------------------------------------------------


@command(
    "symbol load",
    usage="symbol load FILE [OFFSET]",
    args=(FILE, EXPR),
    summary="load an ELF file's symbols (OFFSET added to every address)",
)
def symbol_load(dbg: Debugger, args: str) -> None:
    try:
        words = shlex.split(args)
    except ValueError as e:
        raise CommandError(f"bad file name: {e}") from None
    if not words:
        raise CommandError("a file expected: symbol load FILE [OFFSET]")
    path = words[0]
    offset = dbg.eval(" ".join(words[1:])) if len(words) > 1 else 0
    n = dbg.symbols.load(path, offset)
    extra = f" at offset {offset:#x}" if offset else ""
    print_lines(dbg, f"Loaded {n} symbols from {path}{extra}.")


@command(
    "symbol list",
    usage="symbol list [PATTERN]",
    args=("word",),
    summary="list loaded symbols (PATTERN: a glob or a substring)",
)
def symbol_list(dbg: Debugger, args: str) -> None:
    syms = dbg.symbols.matching(args.strip() or "*")
    lines = []
    for s in syms:
        kind = "abs" if s.absolute else s.kind
        scope = "global" if s.is_global else "local"
        lines.append(f"{s.addr:#018x} {s.size:>6} {kind:<6} {scope:<6} {s.name}")
    print_lines(
        dbg, lines or ["No symbols" + (f" match {args.strip()!r}." if args.strip() else " loaded.")]
    )


@command("symbol clear", usage="symbol clear", summary="forget every loaded symbol")
def symbol_clear(dbg: Debugger, args: str) -> None:
    n = len(dbg.symbols)
    dbg.symbols.clear()
    print_lines(dbg, f"Cleared {n} symbols.")


# -- misc --------------------------------------------------------------------------------------


@command(
    "help",
    usage="help [COMMAND]",
    aliases=("h", "?"),
    args=("word",),
    summary="list commands, or explain one",
)
def help_cmd(dbg: Debugger, args: str) -> None:
    print_lines(dbg, REGISTRY.help(args))


@command(
    "quit",
    usage="quit",
    aliases=("q", "exit"),
    monitor=False,
    summary="detach (breakpoints removed, guest resumed) and leave",
)
def quit_cmd(dbg: Debugger, args: str) -> None:
    dbg.quit_requested = True


def execute(dbg: Debugger, line: str, *, monitor: bool = False) -> None:
    """Run one command line.  XendbgError (including ExprError) propagates."""
    text = line.strip()
    if not text or text.startswith("#"):
        return
    cmd, args = REGISTRY.resolve(text)
    if monitor and not cmd.monitor:
        raise CommandError(
            f"`{cmd.name}` is not available through monitor; use the debugger's own command"
        )
    cmd.handler(dbg, args)


__all__ = ["REGISTRY", "CommandError", "ExprError", "execute", "parse_options"]
