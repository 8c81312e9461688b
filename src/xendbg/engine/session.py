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
where offered, else RFLAGS.TF with DEBUG_EXCEPTION events.  Breakpoints and
watchpoints use debug registers where the backend has them, page-access
events otherwise (byte-exact filtering, the page re-armed after each hit).
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from xendbg.arch.x86.paging import PagingContext
from xendbg.backend.base import Capability, Domain, Event, EventKind, Response
from xendbg.engine.hwbreak import DebugRegisters, HwKind
from xendbg.engine.pagewatch import PageWatches
from xendbg.engine.stops import Stop, StopReason, WatchKind
from xendbg.engine.swbreak import SoftwareBreakpoints
from xendbg.engine.vmem import VirtualMemory
from xendbg.errors import GuestMemoryFault, Unsupported, XendbgError

RFLAGS_TF = 1 << 8
RFLAGS_RF = 1 << 16
DR6_BS = 1 << 14
STEP_TIMEOUT = 10.0  # seconds: one instruction that does not retire by then is a bug


@dataclass(slots=True)
class _Step:
    vcpu: int
    set_tf: bool  # we set RFLAGS.TF and must clear it afterwards


class Session:
    """The debugger engine for one domain.  Methods other than ``interrupt`` must be
    called from one thread at a time."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.caps = domain.capabilities
        self.vmem = VirtualMemory(domain)
        self.sw = SoftwareBreakpoints(domain)
        self.vmem.shadow = self.sw.shadow
        self.vmem.write_filter = self.sw.write_filter
        self.dregs = DebugRegisters(domain) if Capability.DEBUG_REGISTERS in self.caps else None
        self.pwatch = PageWatches(domain) if Capability.MEM_ACCESS in self.caps else None
        self._regs: dict[int, dict[str, int]] = {}
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

        self._hold_pause()
        try:
            for kind, cap in (
                (EventKind.SOFTWARE_BREAKPOINT, Capability.SOFTWARE_BREAKPOINT),
                (EventKind.DEBUG_EXCEPTION, Capability.DEBUG_EXCEPTION),
            ):
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

    # -- introspection ----------------------------------------------------
    @property
    def vcpus(self) -> range:
        return range(self.domain.vcpu_count)

    @property
    def running(self) -> bool:
        return self._running

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
        if any(name in ("cr0", "cr3", "cr4", "efer") for name in values):
            self.vmem.invalidate()

    def pc(self, vcpu: int) -> int:
        return self.registers(vcpu)["rip"]

    def paging(self, vcpu: int) -> PagingContext:
        return VirtualMemory.context(self.registers(vcpu))

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
        self.sw.shadow(gpa, data)
        return bytes(data)

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
        if Capability.SOFTWARE_BREAKPOINT not in self.caps:
            raise Unsupported("software breakpoints", "int3 events are not reported here")
        try:
            gpa = self.translate(v, addr)
        except GuestMemoryFault:
            # Not mapped yet (e.g. a kernel's higher half before it builds its page
            # tables): a debug register watches linear addresses, mapped or not.
            if self.dregs is None or not self.dregs.fits(addr, 1):
                raise
            self.dregs.insert(HwKind.EXEC, addr, 1)
            self._sw_in_dr.add(addr)
            return
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
        return self.sw.remove(addr)

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
        # Step every vCPU parked on one of our int3s over it before letting all go.
        for v in self.vcpus:
            if self._on_our_breakpoint(v):
                self._start_step(v)
                self._running = True
                stop = self._wait_internal(STEP_TIMEOUT)
                if stop is None:
                    self._pause_for_stop()
                    raise XendbgError(f"vCPU {v} did not step over its breakpoint")
                if stop.reason is not StopReason.STEP:
                    self._pending.append(stop)
                    self._running = True
                    return
        self._running = True
        self._answer_held()
        self._invalidate()
        self._release_pause()

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
        """File descriptors a caller may select on while running."""
        return self.domain.event_fd(), self._intr_r

    # -- internals --------------------------------------------------------
    def _set_stop(self, stop: Stop) -> None:
        self.stop = stop
        self.current_vcpu = stop.vcpu
        self._running = False

    def _invalidate(self) -> None:
        self._regs.clear()
        self.vmem.invalidate()

    def _on_our_breakpoint(self, vcpu: int) -> bool:
        rip = self.pc(vcpu)
        if rip not in self.sw:
            return False
        try:
            return self.sw.owns(self.translate(vcpu, rip))
        except GuestMemoryFault:
            return False

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
        if self._dom_paused:
            self.domain.unpause()
            self._dom_paused = False

    def _start_step(self, vcpu: int) -> None:
        """Run exactly one instruction of ``vcpu``; the others stay where they are."""
        regs = self.registers(vcpu)
        lifted: int | None = None
        if regs["rip"] in self.sw:
            lifted = self.sw.lift(regs["rip"])
        set_tf = False
        try:
            if Capability.SINGLESTEP in self.caps:
                self.domain.set_singlestep(vcpu, True)
            elif Capability.DEBUG_EXCEPTION in self.caps:
                if not regs["rflags"] & RFLAGS_TF:
                    self.set_registers(vcpu, {"rflags": regs["rflags"] | RFLAGS_TF})
                    set_tf = True
            else:
                raise Unsupported("single-step", "no single-step or debug-exception events here")
        except BaseException:
            if lifted is not None:
                self.sw.replant(lifted)
            raise
        self._step = _Step(vcpu, set_tf)
        self._lifted = lifted
        others = [v for v in self.vcpus if v != vcpu]
        self._step_paused = []
        if Capability.PAUSE_VCPU in self.caps:
            for v in others:
                self.domain.pause_vcpu(v)
                self._step_paused.append(v)
        self._answer_held(only=vcpu)
        self._invalidate()
        self._release_pause()

    def _finish_step(self) -> None:
        """Undo what _start_step did; called with the domain paused again."""
        st = self._step
        if st is None:
            return
        self._step = None
        if Capability.SINGLESTEP in self.caps:
            self.domain.set_singlestep(st.vcpu, False)
        elif st.set_tf:
            rflags = self.domain.get_registers(st.vcpu)["rflags"]
            self.domain.set_registers(st.vcpu, {"rflags": rflags & ~RFLAGS_TF})
        self._regs.pop(st.vcpu, None)
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
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                return None
            select.select([evfd, self._intr_r], [], [], remaining)

    def _pause_for_stop(self) -> None:
        self._hold_pause()
        self._finish_step()
        self._running = False
        self._invalidate()

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
