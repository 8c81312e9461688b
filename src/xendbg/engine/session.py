"""One debugging session on one domain: all-stop run control over every vCPU.

Theory of operation
-------------------
Attaching pauses the domain (``Domain.pause``) and turns on the event sources
the debugger needs.  While "stopped" the domain's pause count holds one pause
of ours, and any vCPU that raised an event keeps that event unanswered (it is
"held"), exactly as Xen leaves a vCPU with VM_EVENT_FLAG_VCPU_PAUSED.

``resume`` answers held events, steps vCPUs that sit on one of our int3s over
it (the int3 lifted for one instruction), then drops our pause.  ``wait`` turns
backend events into stops: an event that concerns the debugger (our int3, the
step we asked for, an armed debug register, a watched byte) pauses the whole
domain and becomes a ``Stop``; anything else (the guest's own int3, its own TF
trap, an access to an unwatched byte of a watched page) is answered at once so
the guest never notices us.

Single-step is chosen from capabilities: hypervisor single-step (Xen: MTF)
where offered, else RFLAGS.TF with DEBUG_EXCEPTION events, else software
single-step (below).  Hardware breakpoints and watchpoints use debug registers
where the backend has them, page-access events otherwise (byte-exact
filtering, the page re-armed after each hit).

Software breakpoints are int3s reported by SOFTWARE_BREAKPOINT events, or,
where no trap reaches us (Xen PV: Xen without CONFIG_GDBSX drops the guest's
int3 and #DB; HVM under an emulated SVM that never delivers the #BP
intercept), *spin* breakpoints (``spin``): ``jmp $`` planted at the address.
``auto`` picks int3 when the backend announces SOFTWARE_BREAKPOINT.  No event
says that a vCPU reached a ``jmp $``, so while any is planted ``wait`` polls
every vCPU that runs (pause the domain, read RIPs, unpause) at
``poll_interval`` (1 ms, backing off to 5 ms); a vCPU whose RIP translates to
a planted patch is *parked*: the domain stays paused and that is the stop.
Front-ends that select on ``wait_fds`` use ``poll_interval`` as their timeout.
Every vCPU found parked becomes a stop (the others queue as pending, as
simultaneous int3 events do).  ``resume`` steps each vCPU standing on a patch
— on its first byte, or inside it after a one-byte instruction — out of it
with the patch lifted, like an int3 step-over; detaching just restores the
bytes, and a parked vCPU (RIP = the address) carries on with the original
instruction.

Software single-step (``swstep``) decodes the instruction at RIP and holds a
temporary ``jmp $`` on every successor; the step ends when the stepping vCPU
parks on one.  Patches overlapping the instruction itself are lifted first.
With PAUSE_VCPU only the stepping vCPU runs.  Without it (Xen PV) the others
are *frozen*: a temporary ``jmp $`` at each one's RIP keeps it in place.  A
vCPU on the very instruction being stepped is *co-stepped*: it executes that
instruction too, its own successors held.  A vCPU standing on the second byte
of a successor's patch (the next instruction after a one-byte one) is first
stepped once on its own, out of the way; one that cannot be held otherwise
(a successor's patch covers its RIP's first byte) runs meanwhile, and parking
on another vCPU's successor is not a stop: restoring the bytes lets it
continue unaware.  Other vCPUs may run during a step on such a backend in any
case (gdb's default scheduler-locking lets them), so these are semantics, not
leaks.  A step whose only successor is the instruction itself (``jmp $``)
ends at once; a step of a ``rep`` string instruction runs all its iterations.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from xendbg.arch.x86.paging import PagingContext
from xendbg.backend.base import Capability, Domain, Event, EventKind, Response
from xendbg.engine import swstep
from xendbg.engine.hwbreak import DebugRegisters, HwKind
from xendbg.engine.pagewatch import PageWatches
from xendbg.engine.spin import Gpas, SpinBreakpoints, SpinPatch
from xendbg.engine.stops import Stop, StopReason, WatchKind
from xendbg.engine.swbreak import SoftwareBreakpoints
from xendbg.engine.vmem import VirtualMemory
from xendbg.errors import GuestMemoryFault, Unsupported, XendbgError

RFLAGS_TF = 1 << 8
RFLAGS_RF = 1 << 16
DR6_BS = 1 << 14
STEP_TIMEOUT = 10.0  # seconds: one instruction that does not retire by then is a bug
POLL_MIN = 0.001  # seconds between RIP polls right after a resume …
POLL_MAX = 0.005  # … doubling up to this while nothing parks
STEP_OUT_LIMIT = 4  # steps to leave a patch (a one-byte instruction at a breakpoint takes two)


class BreakpointStrategy(enum.StrEnum):
    """How software breakpoints are made (``--breakpoints``)."""

    AUTO = "auto"  # INT3 where the backend reports int3 events, else SPIN
    INT3 = "int3"
    SPIN = "spin"


class StepStrategy(enum.Enum):
    HYPERVISOR = "hypervisor"  # Capability.SINGLESTEP (Xen: MTF)
    TRAP_FLAG = "trap-flag"  # RFLAGS.TF + DEBUG_EXCEPTION events
    SOFTWARE = "software"  # park every successor (swstep)


@dataclass(slots=True)
class _Step:
    vcpu: int
    set_tf: bool  # we set RFLAGS.TF and must clear it afterwards
    start: int = 0  # RIP when the step began
    targets: frozenset[int] = frozenset()  # software step: successors held with jmp $
    holds: list[SpinPatch] = field(default_factory=list)  # temporary patches to release
    lifted: list[SpinPatch] = field(default_factory=list)  # user patches to replant
    # vCPU -> RIPs where it waits without that being a stop (frozen; co-stepped)
    frozen: dict[int, frozenset[int]] = field(default_factory=dict)
    costep: dict[int, int] = field(default_factory=dict)  # co-stepped vCPU -> its start RIP


class _Blocked(Exception):
    """A vCPU that cannot be frozen stands on the second byte of a jmp $ we need."""

    def __init__(self, vcpu: int, rip: int) -> None:
        super().__init__(f"vCPU {vcpu} stands inside a jmp $ patch at {rip:#x}")
        self.vcpu = vcpu


class Session:
    """The debugger engine for one domain.  Methods other than ``interrupt`` must be
    called from one thread at a time."""

    def __init__(self, domain: Domain, *, breakpoints: str = BreakpointStrategy.AUTO) -> None:
        self.domain = domain
        self.caps = domain.capabilities
        self.breakpoints = self._breakpoint_strategy(breakpoints)
        self.stepping = (
            StepStrategy.HYPERVISOR
            if Capability.SINGLESTEP in self.caps
            else StepStrategy.TRAP_FLAG
            if Capability.DEBUG_EXCEPTION in self.caps
            else StepStrategy.SOFTWARE
        )
        self.vmem = VirtualMemory(domain)
        self.sw = SoftwareBreakpoints(domain)
        self.spin = SpinBreakpoints(domain)
        self.vmem.shadow = self._shadow
        self.vmem.write_filter = self._write_filter
        self.dregs = DebugRegisters(domain) if Capability.DEBUG_REGISTERS in self.caps else None
        self.pwatch = PageWatches(domain) if Capability.MEM_ACCESS in self.caps else None
        self._regs: dict[int, dict[str, int]] = {}
        self._ctx: dict[int, PagingContext] = {}  # per-vCPU paging state, like _regs
        self._held: dict[int, Event] = {}
        self._pending: deque[Stop] = deque()
        self._step: _Step | None = None
        self._watch_hit: dict[int, tuple[WatchKind, int]] = {}
        self._running = False
        self._closed = False
        self._intr_r, self._intr_w = os.pipe()
        os.set_blocking(self._intr_r, False)
        self._intr_flag = threading.Event()
        self._monitored: list[EventKind] = []
        self._release: list[tuple[Event, Response]] = []
        self._rf_needed: set[int] = set()
        self._sw_in_dr: set[int] = set()  # software breakpoints held in debug registers
        self._hw_requested: set[int] = set()
        self._lifted: int | None = None
        self._step_paused: list[int] = []
        self._dom_paused = False
        self._ran: set[int] = set()  # vCPUs let run since the last stop (may have parked)
        self._poll_delay = POLL_MIN

        self._hold_pause()
        try:
            for kind, cap in (
                (EventKind.SOFTWARE_BREAKPOINT, Capability.SOFTWARE_BREAKPOINT),
                (EventKind.DEBUG_EXCEPTION, Capability.DEBUG_EXCEPTION),
            ):
                if kind is EventKind.SOFTWARE_BREAKPOINT and (
                    self.breakpoints is not BreakpointStrategy.INT3
                ):
                    continue  # the guest's own int3s need no help from us
                if cap in self.caps:
                    domain.monitor(kind, True)
                    self._monitored.append(kind)
            self._drain_events()
        except BaseException:
            self._teardown()
            raise
        self.current_vcpu = 0
        self.stop: Stop = (
            self._pending.popleft() if self._pending else Stop(0, StopReason.ATTACH, self.pc(0))
        )

    def _breakpoint_strategy(self, name: str) -> BreakpointStrategy:
        try:
            choice = BreakpointStrategy(name)
        except ValueError:
            known = ", ".join(s.value for s in BreakpointStrategy)
            raise XendbgError(f"unknown breakpoint strategy {name!r} (one of {known})") from None
        has_int3 = Capability.SOFTWARE_BREAKPOINT in self.caps
        if choice is BreakpointStrategy.AUTO:
            return BreakpointStrategy.INT3 if has_int3 else BreakpointStrategy.SPIN
        if choice is BreakpointStrategy.INT3 and not has_int3:
            raise Unsupported(
                "int3 breakpoints", "this domain reports no int3 events (use spin breakpoints)"
            )
        return choice

    # -- introspection ----------------------------------------------------
    @property
    def vcpus(self) -> range:
        return range(self.domain.vcpu_count)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def poll_interval(self) -> float | None:
        """While running: how soon to call ``wait`` again even if no ``wait_fds``
        descriptor fires (spin breakpoints are polled); None when stops arrive as events."""
        if self._running and self._polling():
            return self._poll_delay
        return None

    def _check_stopped(self) -> None:
        if self._closed:
            raise XendbgError("session is closed")
        if self._running:
            raise XendbgError("the guest is running: interrupt it first")

    def _check_vcpu(self, vcpu: int) -> None:
        if vcpu not in self.vcpus:
            raise XendbgError(f"no vCPU {vcpu} (the domain has {self.domain.vcpu_count})")

    def registers(self, vcpu: int) -> dict[str, int]:
        self._check_stopped()
        self._check_vcpu(vcpu)
        regs = self._regs.get(vcpu)
        if regs is None:
            regs = self._regs[vcpu] = self.domain.get_registers(vcpu)
        return regs

    def set_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        self._check_stopped()
        self._check_vcpu(vcpu)
        self.domain.set_registers(vcpu, values)
        self._regs.pop(vcpu, None)
        self._ctx.pop(vcpu, None)
        if any(name in ("cr0", "cr3", "cr4", "efer") for name in values):
            self.vmem.invalidate()

    def pc(self, vcpu: int) -> int:
        return self.registers(vcpu)["rip"]

    def paging(self, vcpu: int) -> PagingContext:
        ctx = self._ctx.get(vcpu)
        if ctx is None:
            ctx = self._ctx[vcpu] = VirtualMemory.context(self.registers(vcpu))
        return ctx

    # -- memory -----------------------------------------------------------
    def read_memory(self, vcpu: int, addr: int, size: int, *, partial: bool = False) -> bytes:
        """Guest-virtual read through ``vcpu``'s page tables, breakpoints hidden."""
        ctx = self.paging(vcpu)
        if partial:
            return self.vmem.read_partial(ctx, addr, size)
        return self.vmem.read(ctx, addr, size)

    def write_memory(self, vcpu: int, addr: int, data: bytes) -> None:
        self.vmem.write(self.paging(vcpu), addr, data)

    def translate(self, vcpu: int, addr: int) -> int:
        return self.vmem.translate(self.paging(vcpu), addr)

    def read_phys(self, gpa: int, size: int) -> bytes:
        data = bytearray(self.domain.read_phys(gpa, size))
        self._shadow(gpa, data)
        return bytes(data)

    def _shadow(self, gpa: int, data: bytearray) -> None:
        """Hide every byte the debugger planted (int3s and ``jmp $`` patches)."""
        self.sw.shadow(gpa, data)
        self.spin.shadow(gpa, data)

    def _write_filter(self, gpa: int, data: bytes) -> bytes:
        return self.spin.write_filter(gpa, self.sw.write_filter(gpa, data))

    # -- breakpoints and watchpoints --------------------------------------
    def insert_breakpoint(
        self, addr: int, *, hardware: bool = False, vcpu: int | None = None
    ) -> None:
        self._check_stopped()
        v = self.current_vcpu if vcpu is None else vcpu
        if hardware:
            if self.dregs is None:
                raise Unsupported("hardware breakpoints", "the backend has no debug registers")
            self.dregs.insert(HwKind.EXEC, addr, 1)
            self._hw_requested.add(addr)
            return
        spin = self.breakpoints is BreakpointStrategy.SPIN
        try:
            gpa = self.translate(v, addr)
            gpa2 = self.translate(v, addr + 1) if spin else 0  # jmp $ takes two bytes
        except GuestMemoryFault:
            # Not mapped yet (e.g. a kernel's higher half before it builds its page
            # tables): a debug register watches linear addresses, mapped or not.
            if self.dregs is None or not self.dregs.fits(addr, 1):
                raise
            self.dregs.insert(HwKind.EXEC, addr, 1)
            self._sw_in_dr.add(addr)
            return
        if spin:
            self.spin.insert(addr, (gpa, gpa2))
        else:
            self.sw.insert(addr, gpa)

    def remove_breakpoint(self, addr: int, *, hardware: bool = False) -> bool:
        self._check_stopped()
        if hardware or addr in self._sw_in_dr:
            if not hardware:
                self._sw_in_dr.discard(addr)
                if addr in self._hw_requested:
                    return True  # the same address is also a hardware breakpoint
            elif addr in self._sw_in_dr:
                self._hw_requested.discard(addr)
                return True
            self._hw_requested.discard(addr)
            return self.dregs is not None and self.dregs.remove(HwKind.EXEC, addr, 1)
        return self.sw.remove(addr) or self.spin.remove(addr)

    def insert_watchpoint(self, kind: WatchKind, addr: int, length: int) -> None:
        self._check_stopped()
        if length <= 0:
            raise XendbgError("a watchpoint needs a length of at least 1")
        hw = {
            WatchKind.WRITE: HwKind.WRITE,
            WatchKind.READ: HwKind.ACCESS,
            WatchKind.ACCESS: HwKind.ACCESS,
        }[kind]
        if self.dregs is not None and self.dregs.fits(addr, length):
            self.dregs.insert(hw, addr, length, watch=kind)
            return
        if self.pwatch is not None:
            ctx = self.paging(self.current_vcpu)
            self.pwatch.insert(kind, addr, length, self.vmem.chunks(ctx, addr, length))
            return
        raise Unsupported(
            "watchpoint", "no free debug register and no page-access events on this backend"
        )

    def remove_watchpoint(self, kind: WatchKind, addr: int, length: int) -> bool:
        self._check_stopped()
        if self.dregs is not None and self.dregs.remove_watch(kind, addr, length):
            return True
        return self.pwatch is not None and self.pwatch.remove(kind, addr, length)

    # -- run control ------------------------------------------------------
    def resume(self, step: int | None = None) -> None:
        """Let the guest go: every vCPU continues, or only ``step`` executes one
        instruction.  Returns at once; ``wait`` reports the next stop."""
        self._check_stopped()
        if self._intr_flag.is_set():  # a stale Ctrl-C that arrived as the guest stopped
            self._intr_flag.clear()
            self._drain_pipe()
        if self._pending:
            # A stop that happened together with the last one: report it without running.
            self._running = True
            return
        if step is not None:
            self._check_vcpu(step)
            self._start_step(step)
            self._running = True
            return
        # Step every vCPU standing on one of our int3s or jmp $ patches past it
        # before letting all go.
        for v in self.vcpus:
            if self._on_our_breakpoint(v):
                stop = self._step_out(v)
                if stop is not None:
                    self._pending.append(stop)
                    self._running = True
                    return
        self._running = True
        if self._pending:  # other vCPUs stopped while one stepped: report them first
            return
        self._answer_held()
        self._invalidate()
        self._ran = set(self.vcpus)
        self._poll_delay = POLL_MIN
        self._release_pause()

    def _step_out(self, v: int) -> Stop | None:
        """Step ``v`` off our breakpoint (and out of a jmp $ patch it ends inside);
        returns a stop that happened meanwhile, which the caller reports."""
        for _ in range(STEP_OUT_LIMIT):
            self._start_step(v)
            self._running = True
            stop = self._wait_internal(STEP_TIMEOUT)
            if stop is None:
                self._pause_for_stop()
                raise XendbgError(f"vCPU {v} did not step over its breakpoint")
            if stop.reason is not StopReason.STEP or stop.vcpu != v:
                return stop
            if not self._inside_patch(v):
                return None
        raise XendbgError(f"vCPU {v} is still inside a jmp $ patch after {STEP_OUT_LIMIT} steps")

    def interrupt(self) -> None:
        """Ask a running guest to stop (thread-safe; ``wait`` reports INTERRUPT)."""
        self._intr_flag.set()
        with contextlib.suppress(OSError):
            os.write(self._intr_w, b"\x03")

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Block until the guest stops (None after ``timeout`` seconds)."""
        if not self._running:
            return self.stop
        stop = self._wait_internal(timeout)
        if stop is not None:
            self._set_stop(stop)
        return stop

    def step(self, vcpu: int, timeout: float = STEP_TIMEOUT) -> Stop:
        self.resume(step=vcpu)
        stop = self.wait(timeout)
        if stop is None:
            self.interrupt()
            stop = self.wait(1.0)
            if stop is None:
                raise XendbgError("single-step did not complete")
        return stop

    def cont(self, timeout: float | None = None) -> Stop | None:
        self.resume()
        return self.wait(timeout)

    def wait_fds(self) -> tuple[int, int]:
        """File descriptors a caller may select on while running (with
        ``poll_interval`` as the timeout: a parked vCPU raises no event)."""
        return self.domain.event_fd(), self._intr_r

    # -- internals --------------------------------------------------------
    def _set_stop(self, stop: Stop) -> None:
        self.stop = stop
        self.current_vcpu = stop.vcpu
        self._running = False

    def _invalidate(self) -> None:
        self._regs.clear()
        self._ctx.clear()
        self.vmem.invalidate()

    def _on_our_breakpoint(self, vcpu: int) -> bool:
        """Does ``vcpu`` stand on our int3, or on (or inside) one of our jmp $ patches?"""
        rip = self.pc(vcpu)
        if rip not in self.sw and not self.spin.active:
            return False
        try:
            gpa = self.translate(vcpu, rip)
        except GuestMemoryFault:
            return False
        return self.sw.owns(gpa) if rip in self.sw else self.spin.patched(gpa)

    def _inside_patch(self, vcpu: int) -> bool:
        """Is ``vcpu``'s RIP on the second byte of a planted jmp $ (after a one-byte
        instruction at a breakpoint)?  Running from there would execute FE …"""
        regs = self.registers(vcpu)
        gpas = self._gpas_of(regs, regs["rip"])
        if gpas is None or not self.spin.patched(gpas[0]):
            return False
        return self.spin.parked_patch(gpas) is None

    def _gpas_of(self, regs: Mapping[str, int], addr: int) -> Gpas | None:
        """Guest-physical addresses of the two bytes at ``addr`` (a jmp $'s place)."""
        try:
            ctx = VirtualMemory.context(regs)
            return self.vmem.translate(ctx, addr), self.vmem.translate(ctx, addr + 1)
        except XendbgError:
            return None

    def _insn_gpas(self, vcpu: int, addr: int, length: int) -> set[int]:
        """Guest-physical addresses of the bytes of the instruction at ``addr``."""
        try:
            chunks = self.vmem.chunks(self.paging(vcpu), addr, length)
        except GuestMemoryFault:
            try:
                chunks = [(self.translate(vcpu, addr), 1)]
            except GuestMemoryFault:
                return set()  # it faults at once: no byte of ours can be in the way
        return {gpa + i for gpa, n in chunks for i in range(n)}

    def _answer_held(self, only: int | None = None) -> None:
        for v in list(self._held):
            if only is None or v == only:
                regs: dict[str, int] = {}
                if v in self._rf_needed:
                    # Resuming from a fault-like DR hit: RF lets the instruction run once.
                    self._rf_needed.discard(v)
                    regs["rflags"] = self.domain.get_registers(v)["rflags"] | RFLAGS_RF
                self.domain.resume(self._held.pop(v), Response(registers=regs))

    def _hold_pause(self) -> None:
        if not self._dom_paused:
            self.domain.pause()
            self._dom_paused = True

    def _release_pause(self) -> None:
        if self.dregs is not None:
            self.dregs.sync()  # debug-register changes reach the vCPUs before they run
        if self._dom_paused:
            self.domain.unpause()
            self._dom_paused = False

    def _start_step(self, vcpu: int, *, aside: bool = True) -> None:
        """Run exactly one instruction of ``vcpu``; the others stay where they are
        (with PAUSE_VCPU or frozen; see the theory of operation)."""
        for _ in range(STEP_OUT_LIMIT):
            try:
                self._try_start_step(vcpu)
                return
            except _Blocked as b:
                if not aside:
                    raise Unsupported("software single-step", str(b)) from None
                # Let the vCPU in the way execute its instruction first: without
                # PAUSE_VCPU other vCPUs may run during a step anyway.
                stop = self._step_aside(b.vcpu)
                if stop is not None:
                    self._pending.append(stop)  # reported instead of the step
                    return
        raise Unsupported("software single-step", f"other vCPUs keep standing in vCPU {vcpu}'s way")

    def _step_aside(self, w: int) -> Stop | None:
        """Software-step ``w`` once (domain paused before and after); a stop other
        than that step is returned for the caller to report."""
        self._start_step(w, aside=False)
        self._running = True
        stop = self._wait_internal(STEP_TIMEOUT)
        self._running = False
        if stop is None:
            self._pause_for_stop()
            raise XendbgError(f"vCPU {w} did not step out of the way")
        if stop.reason is StopReason.STEP and stop.vcpu == w:
            return None
        return stop

    def _try_start_step(self, vcpu: int) -> None:
        regs = self.registers(vcpu)
        rip = regs["rip"]
        lifted: int | None = None
        if rip in self.sw:
            lifted = self.sw.lift(rip)
        step = _Step(vcpu, False, rip)
        software = self.stepping is StepStrategy.SOFTWARE
        try:
            if self.spin.active or software:
                succ = None
                if software:
                    code, bits = self._code_at(vcpu)
                    succ = swstep.successors(
                        code, rip, bits, regs, lambda a, n: self.read_memory(vcpu, a, n)
                    )
                    length = succ.length
                else:
                    try:
                        code, bits = self._code_at(vcpu)
                        length = swstep.instruction_length(code, rip, bits)
                    except XendbgError:  # 16-bit code, say: TF or MTF steps it all the same
                        length = 1
                insn = self._insn_gpas(vcpu, rip, length)
                # The instruction must execute from the guest's own bytes.
                for p in self.spin.overlapping(insn):
                    if self.spin.lift(p):
                        step.lifted.append(p)
                if succ is not None:
                    if not self._hold_successors(step, succ, insn):
                        # Its only successor is itself (jmp $): one step changes nothing.
                        self._step = step
                        self._lifted = lifted
                        self._ran = set()
                        self._pending.append(Stop(vcpu, StopReason.STEP, rip))
                        return
                    if Capability.PAUSE_VCPU not in self.caps:
                        self._freeze_others(step, insn)
            if self.stepping is StepStrategy.HYPERVISOR:
                self.domain.set_singlestep(vcpu, True)
            elif self.stepping is StepStrategy.TRAP_FLAG and not regs["rflags"] & RFLAGS_TF:
                self.set_registers(vcpu, {"rflags": regs["rflags"] | RFLAGS_TF})
                step.set_tf = True
        except BaseException:
            self._undo_patches(step)
            if lifted is not None:
                self.sw.replant(lifted)
            raise
        self._step = step
        self._lifted = lifted
        others = [v for v in self.vcpus if v != vcpu]
        self._step_paused = []
        if Capability.PAUSE_VCPU in self.caps:
            for v in others:
                self.domain.pause_vcpu(v)
                self._step_paused.append(v)
            self._ran = {vcpu}
        else:
            self._ran = set(self.vcpus)
        self._poll_delay = POLL_MIN
        self._answer_held(only=vcpu)
        self._invalidate()
        self._release_pause()

    def _code_at(self, vcpu: int) -> tuple[bytes, int]:
        """The guest's own bytes at ``vcpu``'s RIP (patches hidden) and its code size."""
        regs = self.registers(vcpu)
        bits = swstep.code_bits(
            regs, self.domain.word_size, lambda a, n: self.read_memory(vcpu, a, n)
        )
        code = self.read_memory(vcpu, regs["rip"], swstep.MAX_INSN_LENGTH, partial=True)
        return code, bits

    def _hold_successors(self, step: _Step, succ: swstep.Successors, insn: set[int]) -> bool:
        """Hold a jmp $ on every successor but the instruction itself; False if
        there is no other (the instruction jumps to itself)."""
        regs = self.registers(step.vcpu)
        targets = sorted(succ.targets - {succ.addr})
        if not targets:
            return False
        held: set[int] = set()
        for t in targets:
            gpas = self._gpas_of(regs, t)
            if gpas is None:
                continue  # unmapped: reaching it faults into the guest's handler instead
            if insn.intersection(gpas):
                raise Unsupported(
                    "software single-step",
                    f"`{succ.text}` at {succ.addr:#x} may continue at {t:#x}, inside its own "
                    "bytes, where no jmp $ can be planted",
                )
            p, lifted = self.spin.hold(gpas)
            step.holds.append(p)
            step.lifted += lifted
            held.add(t)
        if not held:
            raise Unsupported(
                "software single-step",
                f"no successor of `{succ.text}` at {succ.addr:#x} is mapped: "
                + ", ".join(f"{t:#x}" for t in targets),
            )
        step.targets = frozenset(held)
        return True

    def _freeze_others(self, step: _Step, insn: set[int]) -> None:
        """Without PAUSE_VCPU: hold every other vCPU at its RIP with a jmp $; one on
        the stepping instruction itself executes it once too (co-stepped)."""
        for w in self.vcpus:
            if w == step.vcpu or w in self._held:
                continue  # a held vCPU waits for its event's answer anyway
            regs = self.registers(w)
            rip = regs["rip"]
            gpas = self._gpas_of(regs, rip)
            if gpas is None:
                continue
            if rip == step.start and gpas[0] in insn:
                step.frozen[w] = self._co_step(step, w, insn)
                continue
            frozen = False
            if not insn.intersection(gpas):
                try:
                    p, lifted = self.spin.hold(gpas)
                except Unsupported:
                    pass  # it would share a byte with a successor's patch
                else:
                    step.holds.append(p)
                    step.lifted += lifted
                    step.frozen[w] = frozenset({rip})
                    frozen = True
            if not frozen and self.spin.patched(gpas[0]) and self.spin.parked_patch(gpas) is None:
                raise _Blocked(w, rip)

    def _co_step(self, step: _Step, w: int, insn: set[int]) -> frozenset[int]:
        """Hold ``w``'s own successors of the instruction it shares with the stepping
        vCPU; returns where it may then wait.  A successor that cannot be held (or
        an instruction swstep cannot follow) lets ``w`` run on: a residual risk."""
        regs = self.registers(w)
        waits = {regs["rip"]}
        held = False
        try:
            code, bits = self._code_at(w)
            succ = swstep.successors(
                code, regs["rip"], bits, regs, lambda a, n: self.read_memory(w, a, n)
            )
        except XendbgError:
            return frozenset(waits)
        for t in succ.targets - {succ.addr}:
            gpas = self._gpas_of(regs, t)
            if gpas is None or insn.intersection(gpas):
                continue
            try:
                p, lifted = self.spin.hold(gpas)
            except Unsupported:
                continue
            step.holds.append(p)
            step.lifted += lifted
            waits.add(t)
            held = True
        if held:
            step.costep[w] = regs["rip"]  # the step ends once it has executed too
        return frozenset(waits)

    def _undo_patches(self, step: _Step) -> None:
        for p in step.holds:
            self.spin.release_hold(p)
        step.holds = []
        for p in step.lifted:
            self.spin.replant(p)
        step.lifted = []

    def _finish_step(self) -> None:
        """Undo what _start_step did; called with the domain paused again."""
        st = self._step
        if st is None:
            return
        self._step = None
        if self.stepping is StepStrategy.HYPERVISOR:
            self.domain.set_singlestep(st.vcpu, False)
        elif st.set_tf:
            rflags = self.domain.get_registers(st.vcpu)["rflags"]
            self.domain.set_registers(st.vcpu, {"rflags": rflags & ~RFLAGS_TF})
        self._regs.pop(st.vcpu, None)
        self._ctx.pop(st.vcpu, None)
        self._undo_patches(st)
        if self._lifted is not None:
            self.sw.replant(self._lifted)
            self._lifted = None
        for v in self._step_paused:
            self.domain.unpause_vcpu(v)
        self._step_paused = []

    def _wait_internal(self, timeout: float | None) -> Stop | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        evfd = self.domain.event_fd()
        while True:
            if self._pending:
                self._pause_for_stop()
                return self._pending.popleft()
            ev = self.domain.poll_event(0)
            if ev is not None:
                got = self._handle(ev)
                if got is not None:
                    self._pause_for_stop()
                    self._drain_events()
                    return got
                continue
            if self._intr_flag.is_set():
                self._intr_flag.clear()
                self._drain_pipe()
                self._pause_for_stop()
                self._drain_events()
                if self._pending:
                    return self._pending.popleft()
                v = self.current_vcpu
                return Stop(v, StopReason.INTERRUPT, self.pc(v))
            polling = self._polling()
            if polling and self._poll_parked():
                continue  # the stops are pending now
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                return None
            if polling:
                pause = self._poll_delay
                self._poll_delay = min(2 * self._poll_delay, POLL_MAX)
                remaining = pause if remaining is None else min(remaining, pause)
            select.select([evfd, self._intr_r], [], [], remaining)

    def _pause_for_stop(self) -> None:
        self._hold_pause()
        if self._ran and self._polling():
            # vCPUs that parked before the domain stopped are stops too (like
            # simultaneous int3 events), reported after this one.
            self._pending.extend(self._scan_parked())
        self._ran = set()
        self._finish_step()
        self._running = False
        self._invalidate()

    # -- parked vCPUs (spin breakpoints, software single-step) ---------------
    def _polling(self) -> bool:
        """Can a vCPU park (so that only polling RIPs finds the stop)?"""
        return self.spin.active

    def _poll_parked(self) -> bool:
        """Pause, look for parked vCPUs, unpause if none; True (domain paused, the
        stops pending) if some vCPU parked."""
        if not self._ran or self._dom_paused:
            return False
        self.domain.pause()
        try:
            stops = self._scan_parked()
        except BaseException:
            self.domain.unpause()
            raise
        if not stops:
            self.domain.unpause()
            return False
        self._dom_paused = True  # this pause is now the stop's
        self._ran = set()
        self._pending.extend(stops)
        return True

    def _scan_parked(self) -> list[Stop]:
        """Stops of the vCPUs that ran and now spin on a patch (domain paused): the
        stepping vCPU on a successor, any vCPU on a user breakpoint.  vCPUs frozen
        for a step, or parked on another vCPU's successor, are not stops."""
        st = self._step
        reported = {s.vcpu for s in self._pending}
        stops: list[Stop] = []
        for v in sorted(self._ran):
            if v in self._held or v in reported:
                continue
            regs = self.domain.get_registers(v)
            rip = regs["rip"]
            if st is not None and v == st.vcpu and rip in st.targets:
                if not self._costeps_pending(st):
                    stops.insert(0, self._step_stop(v, rip))
                continue
            if st is not None and rip in st.frozen.get(v, ()):
                continue
            gpas = self._gpas_of(regs, rip)
            if gpas is not None and self.spin.is_breakpoint(gpas):
                stops.append(Stop(v, StopReason.SW_BREAKPOINT, rip))
        return stops

    def _drain_events(self) -> None:
        """Handle events raised before the domain stopped; stops become pending."""
        while (ev := self.domain.poll_event(0)) is not None:
            stop = self._handle(ev)
            if stop is not None:
                self._pending.append(stop)

    def _drain_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._intr_r, 64):
                pass

    def _handle(self, ev: Event) -> Stop | None:
        """Turn one backend event into a stop, or answer it so the guest goes on."""
        v = ev.vcpu
        st = self._step
        if ev.kind is EventKind.SOFTWARE_BREAKPOINT:
            gpa = self._gpa_of(v, ev.rip)
            if gpa is not None and self.sw.owns(gpa):
                self._held[v] = ev
                return Stop(v, StopReason.SW_BREAKPOINT, ev.rip)
            self.domain.resume(ev, Response(reinject=True))
            return None
        if ev.kind is EventKind.SINGLESTEP and st is not None and st.vcpu == v:
            self._held[v] = ev
            return self._step_stop(v, ev.rip)
        if ev.kind is EventKind.DEBUG_EXCEPTION:
            dr6 = ev.dr6 or 0
            hit = self.dregs.hit(dr6) if self.dregs is not None else None
            if hit is not None:
                self._held[v] = ev
                if hit.kind is HwKind.EXEC:
                    self._rf_needed.add(v)
                    sw = hit.addr in self._sw_in_dr and hit.addr not in self._hw_requested
                    reason = StopReason.SW_BREAKPOINT if sw else StopReason.HW_BREAKPOINT
                    return Stop(v, reason, ev.rip)
                wk = hit.watch or WatchKind.ACCESS
                return Stop(v, StopReason.WATCHPOINT, ev.rip, wk, hit.addr)
            if dr6 & DR6_BS and st is not None and st.vcpu == v:
                self._held[v] = ev
                return self._step_stop(v, ev.rip)
            self.domain.resume(ev, Response(reinject=True))
            return None
        if ev.kind is EventKind.MEM_ACCESS and self.pwatch is not None:
            match = self.pwatch.match(ev)
            if match is None:
                self.domain.resume(ev, Response(allow=True))
                return None
            # Let the access happen once, then stop right after it (GDB reports a
            # watchpoint after the write, showing old and new value).
            self._watch_hit[v] = match
            if st is not None and st.vcpu == v:
                self.domain.resume(ev, Response(allow=True))
                return None
            # Turn the access into a step of that vCPU alone: its step event
            # comes right after the instruction and reports the watchpoint.
            self._held[v] = ev
            self._hold_pause()
            self._running = False
            self._start_step(v)
            self._running = True
            return None
        # Events nobody asked the debugger for: let the guest continue untouched.
        self.domain.resume(ev, Response())
        return None

    def _step_stop(self, v: int, rip: int) -> Stop:
        hit = self._watch_hit.pop(v, None)
        if hit is not None:
            return Stop(v, StopReason.WATCHPOINT, rip, hit[0], hit[1])
        return Stop(v, StopReason.STEP, rip)

    def _gpa_of(self, vcpu: int, addr: int) -> int | None:
        try:
            regs = self.domain.get_registers(vcpu)
            return self.vmem.translate(VirtualMemory.context(regs), addr)
        except XendbgError:
            return None

    def _costeps_pending(self, st: _Step) -> bool:
        """Has a co-stepped vCPU not executed the shared instruction yet?"""
        return any(self.domain.get_registers(w)["rip"] == rip for w, rip in st.costep.items())

    # -- detach -----------------------------------------------------------
    def detach(self) -> None:
        """Remove every breakpoint and watchpoint, restore memory and page rights,
        turn our event sources off and let the domain run.  Idempotent."""
        if self._closed:
            return
        if self._running:
            self.interrupt()
            self.wait(2.0)
        self._teardown()

    close = detach

    def _teardown(self) -> None:
        self._closed = True
        errors: list[BaseException] = []
        for undo in self._undo_steps():
            try:
                undo()
            except XendbgError as e:  # keep undoing the rest; report the first failure
                errors.append(e)
        for fd in (self._intr_r, self._intr_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if errors:
            raise errors[0]

    def _undo_steps(self) -> Iterator[Callable[[], None]]:
        yield self._finish_step
        yield self._collect_held
        yield self.sw.remove_all
        # A vCPU parked on a jmp $ has RIP on its first byte: with the guest's bytes
        # back it simply executes the original instruction.
        yield self.spin.remove_all
        if self.dregs is not None:
            yield self.dregs.clear
        if self.pwatch is not None:
            yield self.pwatch.clear
        for kind in self._monitored:
            yield functools.partial(self.domain.monitor, kind, False)
        yield self._release_held
        yield self._release_pause

    def _collect_held(self) -> None:
        """Decide, while our int3s are still known, how each unanswered event ends:
        the guest's own traps are re-injected, ours simply retried (int3 gone)."""
        while (ev := self.domain.poll_event(0)) is not None:
            self._held.setdefault(ev.vcpu, ev)
        self._release = []
        for v in list(self._held):
            ev = self._held.pop(v)
            ours = ev.kind is not EventKind.SOFTWARE_BREAKPOINT or self.sw.owns(
                self._gpa_of(v, ev.rip) or -1
            )
            self._release.append((ev, Response(reinject=not ours)))

    def _release_held(self) -> None:
        for ev, resp in self._release:
            self.domain.resume(ev, resp)
        self._release = []
