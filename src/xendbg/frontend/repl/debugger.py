"""REPL state over one engine session: variables, numbered breakpoints and
watchpoints, symbols, run control with Ctrl-C, stop reports and the context view.

Commands (commands.py) parse text and call this; everything user-visible goes to
``self.out`` (a rich Console), so gdb's ``monitor`` can capture the very same
output as plain text.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

from rich.console import Console
from rich.text import Text

from xendbg.arch.x86.regnames import BASE
from xendbg.backend.base import Capability
from xendbg.engine.session import Session
from xendbg.engine.stops import Stop, StopReason, WatchKind
from xendbg.errors import GuestMemoryFault, XendbgError
from xendbg.frontend.repl import context, disasm
from xendbg.frontend.repl.expr import MASK64, evaluate
from xendbg.frontend.repl.registry import CommandError
from xendbg.frontend.repl.regs import RegisterNames
from xendbg.frontend.repl.symbols import SymbolTable
from xendbg.frontend.repl.target import Target

INTERRUPT_TIMEOUT = 5.0  # seconds for a running guest to stop once interrupted
WATCH_LETTER = {WatchKind.WRITE: "w", WatchKind.READ: "r", WatchKind.ACCESS: "a"}
_ANY_REGISTER = RegisterNames(8, frozenset(BASE))  # names that mean a register on any guest
WATCH_NAME = {WatchKind.WRITE: "write", WatchKind.READ: "read", WatchKind.ACCESS: "access"}


@dataclass(slots=True)
class Breakpoint:
    id: int
    addr: int
    hardware: bool
    expr: str
    hits: int = 0
    temporary: bool = False


@dataclass(slots=True)
class Watchpoint:
    id: int
    kind: WatchKind
    addr: int
    length: int
    expr: str
    hits: int = 0
    last: bytes | None = field(default=None)


class Debugger:
    def __init__(
        self,
        out: Console,
        *,
        target: Target | None = None,
        session: Session | None = None,
        symbols: SymbolTable | None = None,
        context_after_stop: bool = True,
        breakpoints: str = "auto",
    ) -> None:
        self.out = out
        self.breakpoint_strategy = breakpoints  # for the sessions it makes: auto, int3, spin
        self.target = target
        self._session = session
        self.owns_session = session is None
        self.symbols = symbols if symbols is not None else SymbolTable()
        self.variables: dict[str, int] = {}
        self.breakpoints: dict[int, Breakpoint] = {}
        self.watchpoints: dict[int, Watchpoint] = {}
        self.next_id = 1
        self.context_after_stop = context_after_stop
        self._names: RegisterNames | None = None
        self._shown: dict[int, dict[str, int]] = {}  # registers at the last context view
        self.quit_requested = False
        self.sigint = False  # Ctrl-C arrived while the guest ran

    # -- session ------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._session is not None

    @property
    def session(self) -> Session:
        if self._session is None:
            raise CommandError("not attached to a guest (`guest attach`)")
        return self._session

    def attach(self, ident: str | None = None) -> Session:
        if self._session is not None:
            raise CommandError(
                f"already attached to domain {self._session.domain.domid} (`guest detach` first)"
            )
        if self.target is None:
            raise CommandError("no target to attach to")
        dom = self.target.domain(ident)
        self._session = Session(dom, breakpoints=self.breakpoint_strategy)
        self.target.attached(dom)
        self._names = None
        self._shown.clear()
        return self._session

    def detach(self) -> None:
        """Remove every breakpoint and watchpoint and let the guest run."""
        s = self._session
        if s is None:
            return
        self._session = None
        self.breakpoints.clear()
        self.watchpoints.clear()
        self._shown.clear()
        try:
            s.detach()
        finally:
            if self.target is not None:
                self.target.detached(s.domain)

    def close(self) -> None:
        try:
            if self.owns_session:
                self.detach()
        finally:
            if self.target is not None:
                self.target.close()

    @property
    def names(self) -> RegisterNames:
        if self._names is None:
            s = self.session
            self._names = RegisterNames(s.domain.word_size, frozenset(s.registers(s.current_vcpu)))
        return self._names

    @property
    def word_size(self) -> int:
        return self.session.domain.word_size

    @property
    def vcpu(self) -> int:
        return self.session.current_vcpu

    def registers(self, vcpu: int | None = None) -> dict[str, int]:
        return self.session.registers(self.vcpu if vcpu is None else vcpu)

    def pc(self) -> int:
        return self.registers()["rip"]

    # -- expressions (xendbg.frontend.repl.expr.Env) ------------------------------
    def register(self, name: str) -> int | None:
        if not self.attached:
            if name.lower() in _ANY_REGISTER.fields:
                raise CommandError(f"${name}: not attached to a guest (`guest attach`)")
            return None
        return self.names.read(self.registers(), name)

    def variable(self, name: str) -> int | None:
        return self.variables.get(name)

    def symbol(self, name: str) -> int | None:
        return self.symbols.address(name)

    def read_word(self, addr: int) -> int:
        ws = self.word_size
        return int.from_bytes(self.session.read_memory(self.vcpu, addr, ws), "little")

    def eval(self, text: str) -> int:
        return evaluate(text, self)

    def eval_addr(self, text: str) -> int:
        return self.eval(text) & MASK64

    def describe(self, addr: int) -> str | None:
        return self.symbols.describe(addr)

    def read_partial(self, addr: int, size: int) -> bytes:
        try:
            return self.session.read_memory(self.vcpu, addr, size, partial=True)
        except GuestMemoryFault:
            return b""

    def set_register(self, name: str, value: int) -> None:
        names = self.names
        if names.field(name) is None:
            raise CommandError(f"no register ${name}")
        self.session.set_registers(self.vcpu, names.update(self.registers(), name, value))

    # -- breakpoints and watchpoints ------------------------------------------------
    def _new_id(self) -> int:
        n = self.next_id
        self.next_id += 1
        return n

    def add_breakpoint(
        self, addr: int, expr: str, *, hardware: bool = False, temporary: bool = False
    ) -> Breakpoint:
        for bp in self.breakpoints.values():
            if bp.addr == addr and bp.hardware == hardware and not temporary:
                raise CommandError(f"breakpoint {bp.id} is already at {addr:#x}")
        self.session.insert_breakpoint(addr, hardware=hardware)
        bp = Breakpoint(self._new_id(), addr, hardware, expr, temporary=temporary)
        self.breakpoints[bp.id] = bp
        return bp

    def delete_breakpoint(self, bp_id: int) -> Breakpoint:
        bp = self.breakpoints.get(bp_id)
        if bp is None:
            raise CommandError(f"no breakpoint {bp_id}")
        others = [
            b
            for b in self.breakpoints.values()
            if b is not bp and b.addr == bp.addr and b.hardware == bp.hardware
        ]
        if not others:
            self.session.remove_breakpoint(bp.addr, hardware=bp.hardware)
        del self.breakpoints[bp_id]
        return bp

    def add_watchpoint(self, kind: WatchKind, addr: int, length: int, expr: str) -> Watchpoint:
        self.session.insert_watchpoint(kind, addr, length)
        wp = Watchpoint(self._new_id(), kind, addr, length, expr)
        with contextlib.suppress(XendbgError):
            wp.last = self.session.read_memory(self.vcpu, addr, length)
        self.watchpoints[wp.id] = wp
        return wp

    def delete_watchpoint(self, wp_id: int) -> Watchpoint:
        wp = self.watchpoints.get(wp_id)
        if wp is None:
            raise CommandError(f"no watchpoint {wp_id}")
        self.session.remove_watchpoint(wp.kind, wp.addr, wp.length)
        del self.watchpoints[wp_id]
        return wp

    # -- run control ------------------------------------------------------------------
    @contextlib.contextmanager
    def _ctrl_c_interrupts(self) -> Iterator[None]:
        """While the guest runs, Ctrl-C (SIGINT) asks the engine to stop it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        session = self.session
        self.sigint = False

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            self.sigint = True  # also ends a multi-instruction step between two steps
            session.interrupt()

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)

    def _wait(self, timeout: float | None) -> Stop:
        """Wait for the running guest to stop; after ``timeout`` seconds interrupt it."""
        s = self.session
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                s.interrupt()
                stop = s.wait(INTERRUPT_TIMEOUT)
                if stop is None:
                    raise XendbgError("the guest did not stop after an interrupt")
                return stop
            stop = s.wait(remaining)
            if stop is not None:
                return stop

    def cont(self, timeout: float | None = None) -> Stop:
        s = self.session
        with self._ctrl_c_interrupts():
            s.resume()
            stop = self._wait(timeout)
        self.after_stop(stop)
        return stop

    def step(self, count: int = 1, *, over_calls: bool = False) -> Stop:
        s = self.session
        stop = s.stop
        with self._ctrl_c_interrupts():
            for _ in range(count):
                stop = self._step_over(s.current_vcpu) if over_calls else s.step(s.current_vcpu)
                if stop.reason is not StopReason.STEP or self.sigint:
                    break
        self.after_stop(stop)
        return stop

    def _step_over(self, vcpu: int) -> Stop:
        """One instruction; a call runs until it returns (temporary breakpoint)."""
        s = self.session
        pc = s.pc(vcpu)
        insn = disasm.decode_one(self.read_partial(pc, 16), pc, self.word_size * 8)
        if insn is None or not insn.is_call:
            return s.step(vcpu)
        ret = insn.end
        temp = None
        if not any(b.addr == ret and not b.hardware for b in self.breakpoints.values()):
            temp = self.add_breakpoint(ret, f"{ret:#x}", temporary=True)
        try:
            s.resume()
            while True:
                stop = self._wait(None)
                if temp is None or stop.pc != ret or stop.vcpu == vcpu:
                    break
                s.resume()  # another vCPU reached our temporary breakpoint
            if temp is not None and stop.pc == ret and stop.reason is StopReason.SW_BREAKPOINT:
                stop = Stop(stop.vcpu, StopReason.STEP, stop.pc)
            return stop
        finally:
            if temp is not None and self.attached and not s.running:
                self.delete_breakpoint(temp.id)

    def unpause(self) -> None:
        """Let the guest run in the background (`guest pause` / Ctrl-C-less stop)."""
        self.session.resume()

    def pause(self) -> Stop:
        s = self.session
        if not s.running:
            raise CommandError("the guest is already paused")
        s.interrupt()
        stop = s.wait(INTERRUPT_TIMEOUT)
        if stop is None:
            raise XendbgError("the guest did not stop after an interrupt")
        self.after_stop(stop)
        return stop

    # -- stop reports -----------------------------------------------------------------
    def after_stop(self, stop: Stop) -> None:
        self.out.print(self.stop_text(stop), highlight=False)
        for bp in [b for b in self.breakpoints.values() if b.temporary]:
            self.delete_breakpoint(bp.id)
        if self.context_after_stop:
            self.show_context()

    def stop_text(self, stop: Stop) -> Text:
        where = f"{stop.pc:#x}" + (f" <{n}>" if (n := self.describe(stop.pc)) else "")
        t = Text()
        r = stop.reason
        if r in (StopReason.SW_BREAKPOINT, StopReason.HW_BREAKPOINT):
            hits = [b for b in self.breakpoints.values() if b.addr == stop.pc and not b.temporary]
            for b in hits:
                b.hits += 1
            ids = ", ".join(str(b.id) for b in hits)
            label = f"Breakpoint {ids}" if ids else "Breakpoint"
            t.append(f"{label}, {where}", style="bold")
        elif r is StopReason.WATCHPOINT:
            t.append(self._watch_text(stop), style="bold")
            t.append(f"\nat {where}")
        elif r is StopReason.STEP:
            t.append(where)
        elif r is StopReason.INTERRUPT:
            t.append(f"Interrupted at {where}", style="bold")
        elif r is StopReason.CRASHED:
            t.append(f"vCPU crashed at {where}: {stop.detail}", style="bold red")
        else:
            t.append(f"Stopped ({r.value}) at {where}")
        if self.session.domain.vcpu_count > 1:
            t.append(f"  [vCPU {stop.vcpu}]")
        return t

    def _watch_text(self, stop: Stop) -> str:
        addr = stop.watch_addr if stop.watch_addr is not None else -1
        wp = next(
            (w for w in self.watchpoints.values() if w.addr <= addr < w.addr + w.length), None
        )
        if wp is None:
            return f"Watchpoint hit at {addr:#x}"
        wp.hits += 1
        head = f"Watchpoint {wp.id} ({WATCH_NAME[wp.kind]}): {wp.expr}"
        try:
            new = self.session.read_memory(self.vcpu, wp.addr, wp.length)
        except XendbgError:
            return head
        old, wp.last = wp.last, new
        nv = int.from_bytes(new, "little")
        if old is None or old == new:
            return f"{head}\nValue = {nv:#x}"
        return f"{head}\nOld value = {int.from_bytes(old, 'little'):#x}\nNew value = {nv:#x}"

    # -- context view -------------------------------------------------------------------
    def show_context(self) -> None:
        s = self.session
        v = s.current_vcpu
        regs = s.registers(v)
        names = self.names
        ws = self.word_size
        out = self.out
        out.rule(f"registers  vCPU {v}", style="dim")
        for line in context.register_lines(names, regs, self._shown.get(v), self.describe):
            out.print(line, highlight=False)
        self._shown[v] = dict(regs)
        out.rule("code", style="dim")
        for line in context.code_lines(
            self.around_pc(regs["rip"]), regs["rip"], self.breakpoint_marks(), self.describe
        ):
            out.print(line, highlight=False)
        out.rule("stack", style="dim")
        sp = regs["rsp"] & ((1 << (ws * 8)) - 1)
        data = self.read_partial(sp, 8 * ws)
        words = [
            int.from_bytes(data[i : i + ws], "little") for i in range(0, len(data) - ws + 1, ws)
        ]
        if not words:
            out.print(f"(stack at {sp:#x} is not mapped)", highlight=False)
        for line in context.stack_lines(sp, words, ws, self.describe, regs.get("rbp")):
            out.print(line, highlight=False)

    def around_pc(self, pc: int, before: int = 3, after: int = 6) -> list[disasm.Insn]:
        hit = self.symbols.lookup(pc)
        starts = [hit[0].addr] if hit else []
        return disasm.window(self.read_partial, pc, self.bits, before, after, starts)

    @property
    def bits(self) -> int:
        """Code size for the disassembler: 16/32/64 from CS.L, CR0.PE and CS.D."""
        regs = self.registers()
        protected = bool(regs.get("cr0", 1) & 1)  # CR0.PE
        if self.word_size == 8 and regs.get("efer", 1 << 10) & (1 << 10):  # EFER.LMA
            return 64
        return 32 if protected else 16

    def breakpoint_marks(self) -> dict[int, int]:
        return {b.addr: b.id for b in self.breakpoints.values() if not b.temporary}

    def has_capability(self, cap: Capability) -> bool:
        return cap in self.session.caps
