# mypy: disable-error-code="no-untyped-call"
# (Unicorn's Python binding leaves many methods unannotated.)
"""EmuDomain: a guest ELF run on Unicorn, one thread per vCPU, with Xen HVM event semantics.

Lifetime differs from Xen: the emulated domain exists only inside this
process.  ``detach()`` undoes everything the debugger set up (events, page
rights, breakpoints, pauses) and lets the guest run on in the background
threads; ``close()`` (alias ``destroy()``) detaches and then stops emulation
and frees the Unicorn instances and guest RAM.  The engine calls ``close()``
when the debugger ends, which ends the emulated guest too.

Debug registers: DR0-3/DR7 written through ``set_registers`` arm emulated
breakpoints (the guest writing its own DRs arms nothing).  Execute breakpoints
are fault-like (rip = the address); the event leaves RFLAGS.RF set, as in the
RFLAGS image a real #DB pushes, so resuming executes the instruction once.
Data breakpoints are trap-like (rip after the access) and are found through
page rights on the guest-physical page the linear address maps to, translated
when armed and whenever the vCPU resumes; a guest switching CR3 to a mapping
that moves the address while running is seen only at the next stop.

Single steps run synchronously: when ``unpause``, ``resume``, ``unpause_vcpu``
(or any call that lets vCPUs go) makes a vCPU in single-step mode runnable, its
one instruction is executed in the calling thread before the call returns, so
its event is already queued (one valid interleaving of Xen's asynchronous
run).  ``on_console`` is then called from that thread too.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from xendbg.backend.base import (
    Access,
    Capability,
    Domain,
    Event,
    EventKind,
    GuestType,
    Response,
)
from xendbg.backend.emu.loader import install, load_image
from xendbg.backend.emu.ram import PAGE_SIZE, GuestRam
from xendbg.backend.emu.vcpu import Vcpu, VcpuState
from xendbg.errors import BackendError, DomainGone, GuestImageError, Unsupported, XendbgError

DEFAULT_MEMORY = 64 << 20
MAX_VCPUS = 64
_STOP_TIMEOUT = 5.0  # seconds a vCPU may take to leave emu_start
_STOP_RETRY = 0.002  # re-send emu_stop this often (an early one can be lost)
_DEBUG_REGS = frozenset({"dr0", "dr1", "dr2", "dr3", "dr7"})
_MONITORABLE = frozenset(
    {
        EventKind.SOFTWARE_BREAKPOINT,
        EventKind.SINGLESTEP,
        EventKind.DEBUG_EXCEPTION,
        EventKind.MEM_ACCESS,
        EventKind.WRITE_CTRLREG,
    }
)
_CR_MONITORABLE = frozenset({0, 3, 4})
_PLAIN_RESPONSE = Response()

_domids = itertools.count(1)


class EmuDomain(Domain):
    """An emulated domain; see the module docstring and ``loader`` for the boot contract."""

    def __init__(
        self,
        path: str | Path,
        *,
        vcpus: int = 1,
        memory: int = DEFAULT_MEMORY,
        name: str | None = None,
        start_paused: bool = False,
        on_console: Callable[[bytes], None] | None = None,
    ) -> None:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise GuestImageError(f"vcpus must be between 1 and {MAX_VCPUS}, not {vcpus}")
        if memory <= 0 or memory % PAGE_SIZE:
            raise GuestImageError(f"memory must be a positive multiple of 4 KiB, not {memory}")
        image = load_image(path)
        self.ram = GuestRam(memory)
        try:
            boot = install(image, self.ram)
        except BaseException:
            self.ram.close()
            raise
        self.domid = next(_domids)
        self.name = name or Path(path).stem
        self.guest_type = GuestType.EMU
        self.word_size = image.word_size
        self.vcpu_count = vcpus
        self.memory_size = memory
        self.capabilities = (
            Capability.PAUSE_VCPU
            | Capability.WRITE_REGISTERS
            | Capability.FPU_REGISTERS
            | Capability.SOFTWARE_BREAKPOINT
            | Capability.SINGLESTEP
            | Capability.DEBUG_EXCEPTION
            | Capability.DEBUG_REGISTERS
            | Capability.MEM_ACCESS
            | Capability.WRITE_CTRLREG
            | Capability.INJECT_TRAP
        )
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self._watchers = 0  # controller threads waiting on cv (notify only if any)
        self.monitored: set[EventKind] = set()
        self.cr_indices: frozenset[int] = frozenset()
        self.rights: dict[int, Access] = {}
        self._pause_count = 1 if start_paused else 0
        self._internal_pauses = 0
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._console = bytearray()
        self._console_lock = threading.Lock()
        self._on_console = on_console
        self._detached = False
        self._destroyed = False
        self._vcpus = [Vcpu(self, i, boot) for i in range(vcpus)]
        for v in self._vcpus:
            v.start()

    @classmethod
    def from_elf(
        cls, path: str | Path, *, vcpus: int = 1, memory: int = DEFAULT_MEMORY
    ) -> EmuDomain:
        return cls(path, vcpus=vcpus, memory=memory)

    # -- VcpuHost -----------------------------------------------------------
    def domain_runnable(self) -> bool:
        return self._pause_count == 0 and self._internal_pauses == 0

    def post(self, vcpu: Vcpu, event: Event) -> None:
        with self.lock:
            vcpu.ctl.pending = event
            self._notify_watchers()
        self._events.put(event)
        os.eventfd_write(self._efd, 1)

    def console(self, data: bytes) -> None:
        with self._console_lock:
            self._console += data
        if self._on_console is not None:
            self._on_console(data)

    # -- emulator extras ----------------------------------------------------
    def console_output(self) -> bytes:
        """Everything the guest wrote to the debug port 0xe9 so far."""
        with self._console_lock:
            return bytes(self._console)

    def vcpu_state(self, vcpu: int) -> VcpuState:
        v = self._vcpu(vcpu)
        with self.lock:
            return v.state()

    def crash_reason(self, vcpu: int) -> str | None:
        v = self._vcpu(vcpu)
        with self.lock:
            return v.ctl.crash_reason

    def wait_state(self, vcpu: int, state: VcpuState, timeout: float) -> bool:
        """Wait until ``vcpu`` is in ``state``; False on timeout."""
        v = self._vcpu(vcpu)
        with self.lock:
            self._watchers += 1
            try:
                return self.cv.wait_for(lambda: v.state() is state, timeout)
            finally:
                self._watchers -= 1

    # -- helpers --------------------------------------------------------------
    def _vcpu(self, vcpu: int) -> Vcpu:
        if self._destroyed:
            raise DomainGone("emu", errno.ESRCH, f"domain {self.name} was closed")
        if not isinstance(vcpu, int) or not 0 <= vcpu < self.vcpu_count:
            raise XendbgError(f"no vCPU {vcpu} (domain {self.name} has {self.vcpu_count})")
        return self._vcpus[vcpu]

    def _live(self, op: str) -> None:
        if self._detached:
            raise DomainGone(op, errno.ESRCH, f"domain {self.name} is detached")

    def _stop(self, v: Vcpu, op: str) -> None:
        """Wait until ``v`` (already made non-runnable) has left emu_start."""
        with self.lock:
            if not v.ctl.busy:
                return
        deadline = time.monotonic() + _STOP_TIMEOUT
        while True:
            with self.lock:
                if not v.ctl.busy:
                    return
                v.ctl.stop_requested = True
                interruptible = v.ctl.interruptible
            if interruptible:
                v.uc.emu_stop()
            with self.lock:
                if v.ctl.busy:
                    self._watchers += 1
                    try:
                        self.cv.wait(_STOP_RETRY)
                    finally:
                        self._watchers -= 1
            if time.monotonic() > deadline:
                raise BackendError(op, errno.ETIMEDOUT, f"vCPU {v.index} did not stop")

    def _stop_all(self, op: str) -> None:
        with self.lock:
            if not any(v.ctl.busy for v in self._vcpus):
                return
        for v in self._vcpus:
            self._stop(v, op)

    def _release(self, vcpus: Iterable[Vcpu]) -> None:
        """Start those of ``vcpus`` that are runnable now (call after making them so).

        A single-stepping vCPU runs its one instruction right here, in the caller's
        thread, while its own thread stays parked (``busy`` keeps it out): the step's
        event is queued before this returns, so a debugger's step costs no thread
        hand-off.  The others are woken to run in their threads.
        """
        steps = []
        with self.lock:
            for v in vcpus:
                if v.ctl.busy or not v.runnable():
                    continue  # a busy thread re-checks runnable() when its slice ends
                if v.ctl.singlestep:
                    v.ctl.busy = True
                    v.ctl.stop_requested = False
                    steps.append(v)
                else:
                    v.wake.notify()
            self._notify_watchers()
        for v in steps:
            try:
                v.run_slice()
            finally:
                with self.lock:
                    v.ctl.busy = False
                    if v.runnable():  # the slice raised no event: its thread goes on
                        v.wake.notify()
                    self._notify_watchers()

    def _notify_watchers(self) -> None:
        """Wake wait_state()/_stop() waiters, if any (call with the lock held)."""
        if self._watchers:
            self.cv.notify_all()

    @contextlib.contextmanager
    def _held(self, op: str) -> Iterator[None]:
        """Every vCPU stopped for the duration; the controller owns their instances."""
        with self.lock:
            self._internal_pauses += 1
        try:
            self._stop_all(op)
            yield
        finally:
            with self.lock:
                self._internal_pauses -= 1
            self._release(self._vcpus)

    def _stopped_vcpu(self, vcpu: int, op: str) -> Vcpu:
        """``vcpu`` if it is stopped (EBUSY otherwise), once its thread let go of it."""
        v = self._vcpu(vcpu)
        with self.lock:
            if not v.stopped():
                raise BackendError(op, errno.EBUSY, f"vCPU {vcpu} is running; pause it first")
            if not v.ctl.busy:
                return v
        self._stop(v, op)
        return v

    # -- run control --------------------------------------------------------
    def pause(self) -> None:
        self._live("pause")
        with self.lock:
            self._pause_count += 1
        self._stop_all("pause")  # returns at once when no vCPU holds its instance

    def unpause(self) -> None:
        self._live("unpause")
        with self.lock:
            if self._pause_count == 0:
                raise BackendError("unpause", errno.EINVAL, "domain is not paused by us")
            self._pause_count -= 1
            if not self.domain_runnable():
                return
        self._release(self._vcpus)

    @property
    def paused(self) -> bool:
        with self.lock:
            return self._pause_count > 0

    def pause_vcpu(self, vcpu: int) -> None:
        self._live("pause_vcpu")
        v = self._vcpu(vcpu)
        with self.lock:
            v.ctl.pause_count += 1
        self._stop(v, "pause_vcpu")

    def unpause_vcpu(self, vcpu: int) -> None:
        self._live("unpause_vcpu")
        v = self._vcpu(vcpu)
        with self.lock:
            if v.ctl.pause_count == 0:
                raise BackendError("unpause_vcpu", errno.EINVAL, f"vCPU {vcpu} is not paused")
            v.ctl.pause_count -= 1
        self._release([v])

    # -- memory ---------------------------------------------------------------
    def read_phys(self, gpa: int, size: int) -> bytes:
        if self._destroyed:
            raise DomainGone("read_phys", errno.ESRCH, f"domain {self.name} was closed")
        return self.ram.read(gpa, size)

    def write_phys(self, gpa: int, data: bytes) -> None:
        if self._destroyed:
            raise DomainGone("write_phys", errno.ESRCH, f"domain {self.name} was closed")
        self.ram.check(gpa, len(data))
        # Translated code is not invalidated by writes from outside the CPU:
        # stop every vCPU and make each flush before it runs again.
        with self._held("write_phys"):
            self.ram.write(gpa, data)
            for v in self._vcpus:
                v.ctl.tb_dirty = True

    # -- registers --------------------------------------------------------------
    def get_registers(self, vcpu: int) -> dict[str, int]:
        v = self._stopped_vcpu(vcpu, "get_registers")
        return v.regs.read_all()

    def set_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        self._live("set_registers")
        v = self._stopped_vcpu(vcpu, "set_registers")
        self._write_registers(v, values)

    def _write_registers(self, v: Vcpu, values: Mapping[str, int]) -> None:
        v.regs.validate(values)
        v.regs.write(values)
        if _DEBUG_REGS & values.keys():
            v.arm_debug_registers()

    # -- events -----------------------------------------------------------------
    def monitor(self, kind: EventKind, enable: bool, *, index: int | None = None) -> None:
        self._live(f"monitor {kind.value}")
        if kind not in _MONITORABLE:
            raise Unsupported(f"monitor {kind.value}", "the emulated backend does not offer it")
        if kind is not EventKind.WRITE_CTRLREG:
            with self.lock:
                if enable:
                    self.monitored.add(kind)
                else:
                    self.monitored.discard(kind)
            return
        if index not in _CR_MONITORABLE:
            raise BackendError(
                "monitor write_ctrlreg", errno.EINVAL, f"CR index must be 0, 3 or 4, not {index}"
            )
        with self._held("monitor write_ctrlreg"):
            indices = set(self.cr_indices)
            if enable:
                indices.add(index)
            else:
                indices.discard(index)
            self.cr_indices = frozenset(indices)
            if indices:
                self.monitored.add(kind)
            else:
                self.monitored.discard(kind)
            for v in self._vcpus:
                v.set_cr_monitoring(bool(indices))

    def set_singlestep(self, vcpu: int, enable: bool) -> None:
        if Capability.SINGLESTEP not in self.capabilities:  # cheaper than require() per step
            self.require(Capability.SINGLESTEP, "set_singlestep")
        self._live("set_singlestep")
        v = self._vcpu(vcpu)
        with self.lock:
            if not v.ctl.busy and not v.runnable():
                v.ctl.singlestep = enable  # parked: its next slice reads the flag
                return
            v.ctl.pause_count += 1  # running: end its slice so the next one sees the flag
        try:
            self._stop(v, "set_singlestep")
            v.ctl.singlestep = enable
        finally:
            with self.lock:
                v.ctl.pause_count -= 1
            self._release([v])

    def set_mem_access(self, gfn: int, access: Access) -> None:
        self._live("set_mem_access")
        if not 0 <= gfn < self.ram.size // PAGE_SIZE:
            raise BackendError("set_mem_access", errno.EINVAL, f"gfn {gfn:#x} is outside guest RAM")
        with self._held("set_mem_access"):
            if access == Access.RWX:
                self.rights.pop(gfn, None)
            else:
                self.rights[gfn] = access
            for v in self._vcpus:
                v.apply_protection()

    def get_mem_access(self, gfn: int) -> Access:
        if not 0 <= gfn < self.ram.size // PAGE_SIZE:
            raise BackendError("get_mem_access", errno.EINVAL, f"gfn {gfn:#x} is outside guest RAM")
        return self.rights.get(gfn, Access.RWX)

    def inject_trap(self, vcpu: int, vector: int, error_code: int | None = None) -> None:
        self._live("inject_trap")
        if not 0 <= vector <= 255:
            raise BackendError("inject_trap", errno.EINVAL, f"vector {vector} outside 0..255")
        v = self._stopped_vcpu(vcpu, "inject_trap")
        with self.lock:
            v.ctl.injections.append((vector, error_code))
            v.ctl.halted = False  # an interrupt or exception ends HLT
        self._release([v])

    def event_fd(self) -> int:
        return self._efd

    def poll_event(self, timeout: float | None = 0.0) -> Event | None:
        nowait = timeout is not None and timeout <= 0
        if nowait and self._events.empty():
            return None  # the common "anything else?" poll, without raising queue.Empty
        try:
            event = self._events.get_nowait() if nowait else self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        return event

    def resume(self, event: Event, response: Response | None = None) -> None:
        self._live("resume")
        response = response or _PLAIN_RESPONSE
        v = self._vcpu(event.vcpu)
        with self.lock:
            pending = v.ctl.pending
            if pending is None or (pending is not event and pending != event):
                raise BackendError("resume", errno.EINVAL, "event is not pending on its vCPU")
        if response.singlestep is not None:
            self.require(Capability.SINGLESTEP, "resume with singlestep")
        self._stop(v, "resume")
        if response.registers:
            self._write_registers(v, response.registers)
        action = self._action_for(v, event, response)
        with self.lock:
            if response.singlestep is not None:
                v.ctl.singlestep = response.singlestep
            if action is not None:
                v.ctl.actions.append(action)
            v.ctl.pending = None
        self._release([v])

    @staticmethod
    def _action_for(v: Vcpu, event: Event, response: Response) -> Callable[[], bool] | None:
        kind = event.kind
        if kind is EventKind.MEM_ACCESS:
            return v.lifted_step_action(nowrite=not response.allow)
        if kind is EventKind.WRITE_CTRLREG:
            if response.allow:
                return v.allow_cr_write()
            return v.deny_cr_write(event.insn_length)
        if response.reinject and kind is EventKind.SOFTWARE_BREAKPOINT:
            return v.deliver_action(3, advance=event.insn_length)
        if response.reinject and kind is EventKind.DEBUG_EXCEPTION:
            # An execute breakpoint is a fault: the pushed RF keeps IRET from re-hitting it.
            fault = bool((event.dr6 or 0) & 0xF) and v.is_exec_breakpoint(event.rip)
            return v.deliver_action(1, set_rf=fault)
        return None

    # -- lifetime ---------------------------------------------------------------
    def detach(self) -> None:
        """Undo everything the debugger did; the guest keeps running in this process."""
        if self._detached:
            return
        with self._held("detach"):
            self.monitored.clear()
            self.cr_indices = frozenset()
            self.rights.clear()
            for v in self._vcpus:
                v.ctl.singlestep = False
                v.ctl.actions.clear()
                v.arm_debug_registers(enabled=False)
                v.set_cr_monitoring(False)
                v.apply_protection()
                v.ctl.pause_count = 0
                if v.ctl.pending is not None:
                    if v.ctl.pending.kind is EventKind.MEM_ACCESS:
                        v.ctl.actions.append(v.lifted_step_action(nowrite=False))
                    v.ctl.pending = None
            while self.poll_event(0) is not None:
                pass
            self._pause_count = 0
            self._detached = True

    def close(self) -> None:
        """Detach, then stop emulation and free the emulator (see module docstring)."""
        if self._destroyed:
            return
        self.detach()
        with self.lock:
            for v in self._vcpus:
                v.ctl.exit = True
                v.wake.notify()
        self._stop_all("close")
        for v in self._vcpus:
            v.thread.join(_STOP_TIMEOUT)
        self._destroyed = True
        for v in self._vcpus:
            if not v.thread.is_alive():
                v.release()
        os.close(self._efd)
        self.ram.close()

    destroy = close
