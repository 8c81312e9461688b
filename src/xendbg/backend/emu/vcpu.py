# mypy: disable-error-code="no-untyped-call"
# (Unicorn's Python binding leaves many methods unannotated.)
"""One emulated vCPU: a Unicorn instance over the shared RAM, run by its own thread.

Theory of operation
-------------------
The thread loops: wait (on its own condition ``wake``, over the domain's lock)
until the vCPU is runnable — no domain/internal/vCPU pause, no unanswered
event, not halted or crashed — then mark itself *busy* (it owns the Unicorn
instance) and run one *slice*: apply what the last ``resume`` asked for, then
``emu_start`` until something stops it.  A single-stepping vCPU's slice is
instead run by the controller in its own thread (``EmuDomain._release``): it
marks the vCPU busy, which keeps the parked thread out, so a debugger's step
needs no thread hand-off.  Hooks never block: they record why they stopped (a
``_Stop``) and call ``emu_stop``; the slice then turns that into an event, an
interrupt delivery, a crash or a halt.  Whoever wants the Unicorn instance
(registers, hooks, page rights) first makes the vCPU non-runnable, then calls
``emu_stop`` until ``busy`` drops (a stop that lands just before ``emu_start``
is lost, hence the retry loop in ``EmuDomain``).

Unicorn facts this relies on (Unicorn 2.1.4, measured in tests/test_emu_*.py):

* every exception goes to UC_HOOK_INTR; ``int3``/``int n`` arrive with RIP past
  the instruction, faults with RIP on it, the TF trap (#DB, vector 1) after the
  instruction with DR6.BS set by Unicorn;
* an ``emu_stop`` from a code hook stops *before* that instruction; from a
  block hook, before the block;
* a ``*_PROT`` hook returning False stops precisely before the access (nothing
  written, RIP on the instruction); returning True lets the access happen;
* memory hooks and hook ranges work on guest-*physical* addresses, code hooks
  on linear ones; hooks are compiled into translated blocks, so the TB cache is
  flushed whenever hooks or page rights change, and whenever guest memory is
  written from outside (``uc.mem_write`` and our RAM writes do not invalidate);
* ``emu_start(count=n)`` needs a TB flush when switching from unlimited runs
  (the instruction counter is a code hook); ``until`` is disabled through
  ``UC_CTL_UC_USE_EXITS`` with an empty exit set, which avoids the spurious #PF
  that translating an unmapped ``until`` address can raise.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs
from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_PROT,
    UC_HOOK_MEM_READ_PROT,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_MEM_WRITE_PROT,
    UC_MEM_FETCH_PROT,
    UC_MEM_READ_PROT,
    UC_MEM_WRITE_PROT,
    UC_MODE_32,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
)
from unicorn import x86_const as x86
from unicorn.unicorn_py3.arch.intel import UcIntel
from unicorn.unicorn_py3.unicorn import Uc, UcError

from xendbg.arch.x86.debugregs import RW, dr7_decode
from xendbg.arch.x86.paging import PagingContext
from xendbg.backend.base import Access, Event, EventKind
from xendbg.backend.emu.interrupts import RFLAGS_RF, TripleFault, deliver
from xendbg.backend.emu.linear import LinearMemory
from xendbg.backend.emu.loader import SEL_CODE, SEL_DATA, BootState
from xendbg.backend.emu.ram import PAGE_SIZE, GuestRam
from xendbg.backend.emu.regs import RegisterFile
from xendbg.backend.emu.ucext import HAVE_VMEM_READ, InstructionFetch
from xendbg.errors import GuestMemoryFault

DEBUG_CONSOLE_PORT = 0xE9  # Xen's HVM debug port / Bochs "port e9 hack"
DR6_BS = 1 << 14
_OPCODE_INT3 = 0xCC
_OPCODE_HLT = 0xF4
_PAGE_SHIFT = 12
_STEP_RETRIES = 3

_UC_PROT = {Access.R: UC_PROT_READ, Access.W: UC_PROT_WRITE, Access.X: UC_PROT_EXEC}
_PROT_ACCESS = {
    UC_MEM_READ_PROT: Access.R,
    UC_MEM_WRITE_PROT: Access.W,
    UC_MEM_FETCH_PROT: Access.X,
}


class VcpuState(enum.StrEnum):
    RUNNING = "running"  # executing, or ready to as soon as the CPU is free
    PAUSED = "paused"  # paused by pause()/pause_vcpu() or waiting for resume(event)
    HALTED = "halted"  # executed HLT; no interrupt will ever wake it
    CRASHED = "crashed"  # fatal emulation error, see crash_reason


class VcpuHost(Protocol):
    """What a vCPU needs from its domain."""

    lock: threading.RLock  # guards every vCPU's ``ctl``; ``cv`` and each ``wake`` use it
    cv: threading.Condition  # notified when a vCPU lets go of its instance or posts
    ram: GuestRam
    monitored: set[EventKind]
    cr_indices: frozenset[int]
    rights: dict[int, Access]

    def domain_runnable(self) -> bool: ...  # called with cv held

    def post(self, vcpu: Vcpu, event: Event) -> None: ...

    def console(self, data: bytes) -> None: ...


def access_to_prot(access: Access) -> int:
    prot = 0
    for flag, bit in _UC_PROT.items():
        if flag in access:
            prot |= bit
    return prot


@dataclass(slots=True)
class _Stop:
    """Why a hook stopped emulation (set in a hook, consumed by the slice)."""

    kind: str  # event | deliver | watch | mem_access | cr_scan | crash
    event: Event | None = None
    vector: int = 0
    error_code: int | None = None
    set_rf: bool = False
    dr6: int = 0
    addresses: tuple[int, ...] = ()
    reason: str = ""
    set_rip: int | None = None


@dataclass(slots=True)
class _Watch:
    """A DR data breakpoint: linear range, which accesses, where it maps now."""

    slot: int
    linear: int
    length: int
    access: Access  # W, or R|W
    gpa: int | None = None


@dataclass(slots=True)
class _CrInsn:
    index: int
    source: int  # Unicorn register id of the source operand
    length: int


Action = Callable[[], bool]  # runs in the slice's thread; True: the vCPU stopped


@dataclass(slots=True)
class _Control:
    """State shared with the controlling thread, guarded by ``host.lock``."""

    busy: bool = False
    interruptible: bool = False
    stop_requested: bool = False
    exit: bool = False
    pause_count: int = 0
    pending: Event | None = None
    halted: bool = False
    crash_reason: str | None = None
    singlestep: bool = False
    tb_dirty: bool = False
    actions: deque[Action] = field(default_factory=deque)
    injections: list[tuple[int, int | None]] = field(default_factory=list)


class Vcpu:
    def __init__(self, host: VcpuHost, index: int, boot: BootState) -> None:
        self.host = host
        self.index = index
        self.word_size = boot.word_size
        self.ctl = _Control()
        # The thread waits here to become runnable; notified only by whoever made it
        # so, so that controller-side notifications never wake (and preempt) it.
        self.wake = threading.Condition(host.lock)
        uc = cast(UcIntel, Uc(UC_ARCH_X86, UC_MODE_64 if boot.word_size == 8 else UC_MODE_32))
        self.uc = uc
        uc.mem_map_ptr(0, host.ram.size, UC_PROT_ALL, host.ram.host_address)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.regs = RegisterFile(uc, boot.word_size)
        self.mem = LinearMemory(host.ram, self._paging_context)
        self._fetch = InstructionFetch(uc) if HAVE_VMEM_READ else None
        self._boot(boot)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        self._md = Cs(CS_ARCH_X86, CS_MODE_64 if boot.word_size == 8 else CS_MODE_32)
        # Owned by whoever holds the Unicorn instance (thread while busy).
        self._stop: _Stop | None = None
        self._count_mode = False
        self._rf_skip: int | None = None
        self._cr_pass: int | None = None
        self._exec_bps: dict[int, int] = {}  # linear address -> DR6 B bits
        self._exec_hooks: dict[int, int] = {}  # linear address -> hook handle
        self._watches: list[_Watch] = []
        self._applied: dict[int, int] = {}  # gfn -> Unicorn perms other than ALL
        self._prot_hook: int | None = None
        self._block_hook: int | None = None
        self._cr_hooks: dict[int, int] = {}  # linear address -> hook handle
        self._cr_cache: dict[tuple[int, int], tuple[int, ...]] = {}
        self._step_undo: list[tuple[int, bytes]] = []
        self._stepped_to: int | None = None
        self.thread = threading.Thread(target=self._main, name=f"emu-vcpu{index}", daemon=True)

    # -- boot -------------------------------------------------------------
    def _boot(self, boot: BootState) -> None:
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, boot.gdt_base, boot.gdt_limit, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0, 0))  # no IDT: exceptions triple-fault
        values = {name: 0 for name in self.regs.names if name.startswith(("r", "e"))}
        values.pop("efer")
        values.update(rip=boot.entry, rdi=self.index, rflags=0x2)
        if boot.word_size == 8:
            values.update(efer=boot.efer, cr4=boot.cr4, cr3=boot.cr3)
        values.update(cr0=boot.cr0, cs=SEL_CODE, ss=SEL_DATA, ds=SEL_DATA, es=SEL_DATA)
        values.update(fs=SEL_DATA, gs=SEL_DATA)
        self.regs.write({k: v for k, v in values.items() if k not in self.regs.absent})

    def _paging_context(self) -> PagingContext:
        r = self.regs
        return PagingContext(r.read("cr0"), r.read("cr3"), r.read("cr4"), r.read("efer"))

    # -- state (call with host.lock held) -----------------------------------
    def runnable(self) -> bool:
        c = self.ctl
        return (
            not c.exit
            and c.pause_count == 0
            and c.pending is None
            and not c.halted
            and c.crash_reason is None
            and self.host.domain_runnable()
        )

    def state(self) -> VcpuState:
        c = self.ctl
        if c.crash_reason is not None:
            return VcpuState.CRASHED
        if c.halted:
            return VcpuState.HALTED
        return VcpuState.RUNNING if self.runnable() else VcpuState.PAUSED

    def stopped(self) -> bool:
        """Not runnable: the controller may take the Unicorn instance once ``busy`` drops."""
        return not self.runnable()

    # -- thread -------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        cv = self.host.cv
        while True:
            with self.host.lock:
                self.ctl.busy = False
                cv.notify_all()  # controllers waiting for the instance or a state
                # busy while parked: the controller borrowed the instance (run_slice).
                while self.ctl.busy or not self.runnable():
                    if self.ctl.exit:
                        return
                    self.wake.wait()
                self.ctl.busy = True
                self.ctl.stop_requested = False
            self.run_slice()

    def run_slice(self) -> None:
        """Run one slice in the calling thread, which has set ``ctl.busy``: this vCPU's
        thread, or the controller running a single step itself (``EmuDomain._release``)."""
        try:
            self._slice()
        except Exception as e:  # a bug here must not kill the thread silently
            self._crash(f"internal error in the emulator backend: {e!r}")

    def _crash(self, reason: str) -> None:
        with self.host.lock:
            self.ctl.crash_reason = reason

    def _post(self, event: Event) -> None:
        self.host.post(self, event)

    def _slice(self) -> None:
        self._prepare()
        self._rf_skip = None
        if self._exec_bps:
            rip = self.regs.read("rip")
            if rip in self._exec_bps and self.regs.read("rflags") & RFLAGS_RF:
                self._rf_skip = rip
        while self.ctl.actions:
            if self.ctl.actions.popleft()():
                return
        while self.ctl.injections:
            vector, error_code = self.ctl.injections.pop(0)
            if not self._deliver(vector, error_code, set_rf=False):
                return
        if self.ctl.singlestep:
            self._single_step()
            return
        with self.host.lock:
            self.ctl.interruptible = True
        try:
            stop, err = self._emu(self.regs.read("rip"), 0)
        finally:
            with self.host.lock:
                self.ctl.interruptible = False
        if self._finish(stop, err):
            return
        if stop is None and err is None:
            with self.host.lock:
                requested = self.ctl.stop_requested
            if not requested or self._after_hlt():
                with self.host.lock:
                    self.ctl.halted = True

    def _prepare(self) -> None:
        if self.ctl.tb_dirty:  # guest memory was written from outside
            self.ctl.tb_dirty = False
            self.flush()
        self._cr_cache.clear()  # code or CR3 may have changed since the last stop
        self.retranslate_watches()

    def _emu(self, rip: int, count: int) -> tuple[_Stop | None, UcError | None]:
        """emu_start from ``rip``; a block seen to write a monitored CR is hooked and rerun."""
        while True:
            stop, err = self._emu_once(rip, count)
            if stop is None or stop.kind != "cr_scan":
                return stop, err
            for address in stop.addresses:
                if address not in self._cr_hooks:
                    self._cr_hooks[address] = self.uc.hook_add(
                        UC_HOOK_CODE, self._on_cr_insn, None, address, address
                    )
            self.flush()
            rip = self.regs.read("rip")

    def _emu_once(self, rip: int, count: int) -> tuple[_Stop | None, UcError | None]:
        if count and not self._count_mode:
            self.uc.ctl_flush_tb()  # cached blocks lack the instruction counter
        self._count_mode = bool(count)
        self._stop = None
        err: UcError | None = None
        try:
            self.uc.emu_start(rip, 0, count=count)
        except UcError as e:
            err = e
        stop, self._stop = self._stop, None
        return stop, err

    def _after_hlt(self) -> bool:
        rip = self.regs.read("rip")
        try:
            return self.mem.read(rip - 1, 1)[0] == _OPCODE_HLT
        except GuestMemoryFault:
            return False

    def _step(self, rip: int | None = None) -> tuple[_Stop | None, UcError | None]:
        """Run exactly one instruction (from ``rip``, if the caller read it already);
        a concurrent pause request does not eat it.  ``self._stepped_to`` is the RIP
        after it when it ended without a stop or error, else None."""
        if rip is None:
            rip = self.regs.read("rip")
        self._stepped_to = None
        for _ in range(_STEP_RETRIES):
            stop, err = self._emu(rip, 1)
            if stop is not None or err is not None:
                return stop, err
            after = self.regs.read("rip")
            if after != rip:
                self._stepped_to = after
                return None, None
            with self.host.lock:
                interrupted = self.ctl.stop_requested
            if not interrupted:
                break
        return None, None

    def _single_step(self) -> None:
        rip = self.regs.read("rip")
        was_hlt = self._opcode_at(rip) == _OPCODE_HLT
        stop, err = self._step(rip)
        after = self._stepped_to
        if self._finish(stop, err):
            return
        if was_hlt:
            with self.host.lock:
                self.ctl.halted = True
        if after is None:  # an exception was delivered, or RIP did not move
            after = self.regs.read("rip")
        self._post(Event(EventKind.SINGLESTEP, self.index, after))

    def _opcode_at(self, rip: int) -> int | None:
        """The first byte of the instruction at ``rip`` (None if unreadable), as
        cheaply as possible: it is read before every single step."""
        if self._fetch is not None:
            byte = self._fetch.byte(rip)
            if byte is not None:
                return byte
        try:
            return self.mem.read(rip, 1)[0]
        except GuestMemoryFault:
            return None

    def _finish(self, stop: _Stop | None, err: UcError | None) -> bool:
        """Act on what stopped emulation.  True if the vCPU must stay stopped."""
        if stop is None:
            if err is not None:
                rip = self.regs.read("rip")
                self._crash(f"{err} at rip {rip:#x}")
                return True
            return False
        if stop.kind == "event":
            assert stop.event is not None
            if stop.set_rip is not None:
                self.regs.write({"rip": stop.set_rip})
            if stop.set_rf:  # like the RFLAGS image of a fault-class #DB frame
                self.regs.write({"rflags": self.regs.read("rflags") | RFLAGS_RF})
            self._post(stop.event)
            return True
        if stop.kind == "deliver":
            return not self._deliver(stop.vector, stop.error_code, set_rf=stop.set_rf)
        if stop.kind == "mem_access":
            assert stop.event is not None
            self._post(stop.event)
            return True
        if stop.kind == "watch":
            return self._watch_hit(stop.dr6)
        self._crash(stop.reason)
        return True

    def _deliver(self, vector: int, error_code: int | None, *, set_rf: bool) -> bool:
        """Deliver to the guest; on failure crash the vCPU.  True if delivered."""
        try:
            deliver(self.regs, self.mem, vector, error_code, set_rf=set_rf)
        except TripleFault as e:
            self._crash(f"triple fault: {e}")
            return False
        with self.host.lock:
            self.ctl.halted = False
        return True

    # -- stepping with lifted page rights -------------------------------------
    def lifted_step(self, *, keep_rights: bool, nowrite: bool) -> bool:
        """Execute one instruction with page restrictions lifted in this instance only.

        ``keep_rights``: lift only watchpoint restrictions (mem_access rights stay);
        ``nowrite``: undo every write the instruction made (EMULATE_NOWRITE).
        True if the vCPU stopped (an event or crash came out of the step).
        """
        lifted = self._desired_protection(watches=False) if keep_rights else {}
        self._protect(lifted)
        hook = None
        if nowrite:
            self._step_undo = []
            hook = self.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_step_write)
            self.flush()
        try:
            stop, err = self._step()
        finally:
            if hook is not None:
                self.uc.hook_del(hook)
                for gpa, old in reversed(self._step_undo):
                    self.host.ram.write(gpa, old)
                self._step_undo = []
            self.apply_protection()
            if hook is not None:
                self.flush()
        if self._finish(stop, err):
            return True
        if stop is None and self.ctl.singlestep:
            self._post(Event(EventKind.SINGLESTEP, self.index, self.regs.read("rip")))
            return True
        return False

    def _watch_hit(self, dr6: int) -> bool:
        stopped = self.lifted_step(keep_rights=True, nowrite=False)
        if stopped or not dr6:
            return stopped
        if EventKind.DEBUG_EXCEPTION in self.host.monitored:
            rip = self.regs.read("rip")
            self._post(Event(EventKind.DEBUG_EXCEPTION, self.index, rip, dr6=dr6))
            return True
        return not self._deliver(1, None, set_rf=False)

    # -- hooks (run in the vCPU thread, inside emu_start) -------------------
    def _record(self, stop: _Stop) -> None:
        if self._stop is None:
            self._stop = stop
        self.uc.emu_stop()

    def _on_intr(self, uc: Uc, intno: int, _: object) -> None:
        rip = self.regs.read("rip")
        monitored = self.host.monitored
        if intno == 3:
            length = 1
            with contextlib.suppress(GuestMemoryFault):
                if self.mem.read(rip - 1, 1)[0] != _OPCODE_INT3:
                    length = 2  # int $3
            if EventKind.SOFTWARE_BREAKPOINT in monitored:
                # Xen HVM reports the int3's own address and leaves RIP there.
                event = Event(
                    EventKind.SOFTWARE_BREAKPOINT, self.index, rip - length, insn_length=length
                )
                self._record(_Stop("event", event, set_rip=rip - length))
            else:
                self._record(_Stop("deliver", vector=3))
        elif intno == 1:  # RFLAGS.TF trap (Unicorn sets DR6.BS itself)
            if EventKind.DEBUG_EXCEPTION in monitored:
                event = Event(EventKind.DEBUG_EXCEPTION, self.index, rip, dr6=DR6_BS)
                self._record(_Stop("event", event))
            else:
                self._record(_Stop("deliver", vector=1))
        else:
            self._record(_Stop("deliver", vector=intno, error_code=self._error_code(intno)))

    def _error_code(self, vector: int) -> int | None:
        # Unicorn does not expose the error code; rebuild the #PF P bit, else 0.
        if vector != 14:
            return None
        try:
            self.mem.translate(self.regs.read("cr2"))
        except GuestMemoryFault:
            return 0
        return 1

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _: object) -> None:
        if port == DEBUG_CONSOLE_PORT:
            self.host.console(bytes([value & 0xFF]))

    def _on_exec_bp(self, uc: Uc, address: int, size: int, _: object) -> None:
        if self._rf_skip == address:
            self._rf_skip = None  # RFLAGS.RF: this instruction runs once unchecked
            return
        dr6 = self._exec_bps.get(address, 0)
        if not dr6:
            return
        if EventKind.DEBUG_EXCEPTION in self.host.monitored:
            event = Event(EventKind.DEBUG_EXCEPTION, self.index, address, dr6=dr6)
            self._record(_Stop("event", event, set_rf=True))
        else:
            self._record(_Stop("deliver", vector=1, set_rf=True))

    def _on_prot(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> bool:
        kind = _PROT_ACCESS.get(access, Access.NONE)
        rights = self.host.rights
        for gfn in {address >> _PAGE_SHIFT, (address + max(size, 1) - 1) >> _PAGE_SHIFT}:
            if kind not in rights.get(gfn, Access.RWX):
                gla = self.regs.read("rip") if kind is Access.X else None
                rip = self.regs.read("rip")
                event = Event(
                    EventKind.MEM_ACCESS, self.index, rip, gpa=address, gla=gla, access=kind
                )
                self._record(_Stop("mem_access", event))
                return False
        dr6 = 0
        for w in self._watches:
            if (
                w.gpa is not None
                and kind in w.access
                and address < w.gpa + w.length
                and w.gpa < address + size
            ):
                dr6 |= 1 << w.slot
        if dr6 or kind is Access.W:
            # A write to a read-only page is discarded even when the hook
            # allows it, so an unwatched write is stepped with rights lifted.
            self._record(_Stop("watch", dr6=dr6))
            return False
        return True

    def _on_step_write(
        self, uc: Uc, access: int, address: int, size: int, value: int, _: object
    ) -> None:
        with contextlib.suppress(GuestMemoryFault):
            self._step_undo.append((address, self.host.ram.read(address, size)))

    def _on_block(self, uc: Uc, address: int, size: int, _: object) -> None:
        key = (address, size)
        found = self._cr_cache.get(key)
        if found is None:
            found = self._scan_cr_writes(address, size)
            self._cr_cache[key] = found
        new = tuple(a for a in found if a not in self._cr_hooks)
        if new:  # the block was translated without the hooks: retranslate it
            self._record(_Stop("cr_scan", addresses=new))

    def _scan_cr_writes(self, address: int, size: int) -> tuple[int, ...]:
        try:
            code = self.mem.read(address, size)
        except GuestMemoryFault:
            return ()
        return tuple(
            a for a, info in self._decode_cr_writes(code, address) if info.index in (0, 3, 4)
        )

    def _decode_cr_writes(self, code: bytes, address: int) -> list[tuple[int, _CrInsn]]:
        out = []
        for insn in self._md.disasm(code, address):
            if insn.mnemonic != "mov" or not insn.op_str.startswith("cr"):
                continue
            dst, src = (s.strip() for s in insn.op_str.split(","))
            source = getattr(x86, f"UC_X86_REG_{src.upper()}", None)
            if source is None or not dst[2:].isdigit():
                continue
            out.append((insn.address, _CrInsn(int(dst[2:]), source, insn.size)))
        return out

    def _on_cr_insn(self, uc: Uc, address: int, size: int, _: object) -> None:
        if self._cr_pass == address:
            self._cr_pass = None
            return
        try:
            decoded = self._decode_cr_writes(self.mem.read(address, size), address)
        except GuestMemoryFault:
            return
        if not decoded or decoded[0][0] != address:
            return
        info = decoded[0][1]
        if info.index not in self.host.cr_indices:
            return
        new = uc.reg_read(info.source)
        old = self.regs.read(f"cr{info.index}")
        event = Event(
            EventKind.WRITE_CTRLREG,
            self.index,
            address,
            insn_length=info.length,
            index=info.index,
            old_value=old,
            new_value=new,
        )
        self._record(_Stop("event", event))

    # -- configuration (controller, vCPU not busy) --------------------------
    def flush(self) -> None:
        """Drop translated code and TLB so hooks and rights changes take effect."""
        self.uc.ctl_flush_tb()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def arm_debug_registers(self, enabled: bool = True) -> None:
        """Follow DR0-3/DR7: exec breakpoints as code hooks, data ones as page rights."""
        exec_bps: dict[int, int] = {}
        watches: list[_Watch] = []
        if enabled:
            state = self.regs.read_all()
            for slot, conf in enumerate(dr7_decode(state["dr7"])):
                if not conf.enabled:
                    continue
                addr = state[f"dr{slot}"]
                if conf.rw is RW.EXECUTE:
                    exec_bps[addr] = exec_bps.get(addr, 0) | 1 << slot
                elif conf.rw is RW.WRITE:
                    watches.append(_Watch(slot, addr & ~(conf.length - 1), conf.length, Access.W))
                elif conf.rw is RW.ACCESS:
                    watches.append(_Watch(slot, addr & ~(conf.length - 1), conf.length, Access.RW))
        changed = False
        for addr in set(self._exec_hooks) - set(exec_bps):
            self.uc.hook_del(self._exec_hooks.pop(addr))
            changed = True
        for addr in set(exec_bps) - set(self._exec_hooks):
            self._exec_hooks[addr] = self.uc.hook_add(
                UC_HOOK_CODE, self._on_exec_bp, None, addr, addr
            )
            changed = True
        self._exec_bps = exec_bps
        self._watches = watches
        if changed:
            self.flush()
        self.retranslate_watches()

    def is_exec_breakpoint(self, address: int) -> bool:
        return address in self._exec_bps

    def retranslate_watches(self) -> None:
        changed = False
        for w in self._watches:
            try:
                gpa: int | None = self.mem.translate(w.linear)
            except GuestMemoryFault:
                gpa = None
            if gpa != w.gpa:
                w.gpa, changed = gpa, True
        if changed:
            self.apply_protection()

    def _desired_protection(self, *, watches: bool = True) -> dict[int, int]:
        want = {gfn: access_to_prot(a) for gfn, a in self.host.rights.items()}
        if watches:
            for w in self._watches:
                if w.gpa is None or w.gpa >= self.host.ram.size:
                    continue
                gfn = w.gpa >> _PAGE_SHIFT
                perms = want.get(gfn, UC_PROT_ALL) & ~UC_PROT_WRITE
                if Access.R in w.access:
                    perms &= ~UC_PROT_READ
                want[gfn] = perms
        return {gfn: p for gfn, p in want.items() if p != UC_PROT_ALL}

    def apply_protection(self) -> None:
        """Make this instance's page rights match mem_access rights and watchpoints."""
        self._protect(self._desired_protection())

    def _protect(self, want: dict[int, int]) -> None:
        changed = False
        for gfn in set(self._applied) | set(want):
            new = want.get(gfn, UC_PROT_ALL)
            if self._applied.get(gfn, UC_PROT_ALL) != new:
                self.uc.mem_protect(gfn << _PAGE_SHIFT, PAGE_SIZE, new)
                changed = True
        self._applied = dict(want)
        if want and self._prot_hook is None:
            self._prot_hook = self.uc.hook_add(
                UC_HOOK_MEM_READ_PROT | UC_HOOK_MEM_WRITE_PROT | UC_HOOK_MEM_FETCH_PROT,
                self._on_prot,
            )
            changed = True
        elif not want and self._prot_hook is not None:
            self.uc.hook_del(self._prot_hook)
            self._prot_hook = None
            changed = True
        if changed:
            self.flush()

    def set_cr_monitoring(self, on: bool) -> None:
        if on and self._block_hook is None:
            self._block_hook = self.uc.hook_add(UC_HOOK_BLOCK, self._on_block)
        elif not on:
            if self._block_hook is not None:
                self.uc.hook_del(self._block_hook)
                self._block_hook = None
            for handle in self._cr_hooks.values():
                self.uc.hook_del(handle)
            self._cr_hooks.clear()
        self._cr_cache.clear()
        self.flush()

    def allow_cr_write(self) -> Action:
        def act() -> bool:
            self._cr_pass = self.regs.read("rip")
            return False

        return act

    def deny_cr_write(self, length: int) -> Action:
        def act() -> bool:
            self.regs.write({"rip": self.regs.read("rip") + length})
            return False

        return act

    def deliver_action(self, vector: int, *, advance: int = 0, set_rf: bool = False) -> Action:
        def act() -> bool:
            if advance:
                self.regs.write({"rip": self.regs.read("rip") + advance})
            return not self._deliver(vector, None, set_rf=set_rf)

        return act

    def lifted_step_action(self, *, nowrite: bool) -> Action:
        return lambda: self.lifted_step(keep_rights=False, nowrite=nowrite)

    def release(self) -> None:
        """Free the Unicorn instance now rather than at garbage collection (thread stopped)."""
        finalizer = getattr(self.uc, "_Uc__finalizer", None)
        if finalizer is not None:
            finalizer()
