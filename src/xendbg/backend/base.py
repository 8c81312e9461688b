"""The Domain interface every backend implements.

A backend is a thin driver in the manner of gdbserver's target ops and LibVMI's
driver table: it exposes what the hypervisor (or emulator) offers and nothing
more.  Breakpoints as a user sees them, address translation, memory shadowing
and GDB live above it, in ``xendbg.engine``.

Semantics follow Xen HVM's vm_event model (seed 000, seed 001):

* The domain runs on its own.  ``pause()``/``unpause()`` nest like
  ``xc_domain_pause``/``xc_domain_unpause``: ``pause`` returns once no vCPU
  executes guest code.
* A vCPU that raises an event stays paused (Xen's ``VM_EVENT_FLAG_VCPU_PAUSED``)
  until ``resume(event, response)`` answers that event, whatever else happens
  to the domain's pause count.
* Optional operations are announced in ``capabilities``; calling one that is
  not announced raises :class:`~xendbg.errors.Unsupported`.  Never probe with
  ``hasattr``.

Failure rules, op by op, are in each method's docstring.  Every failure is an
``XendbgError``: ``BackendError`` (with the failing call and errno),
``GuestMemoryFault`` (with the address), ``Unsupported`` or ``DomainGone``.

Register names are the canonical names of :mod:`xendbg.arch.x86.registers`
(``rax`` … ``r15``, ``rip``, ``rflags``, segment selectors, ``fs_base``,
``gs_base``, ``kernel_gs_base``, ``cr0`` … ``cr8``, ``efer``, ``dr0`` … ``dr7``,
``st0`` … ``st7``, ``xmm0`` … ``xmm15``, ``mxcsr`` …), the same for 32- and
64-bit guests (a 32-bit guest's ``eax`` is the low half of ``rax``).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from xendbg.errors import Unsupported


class GuestType(enum.StrEnum):
    """How the guest is virtualised (Xen's domain flavours, plus the emulator)."""

    HVM = "hvm"
    PVH = "pvh"
    PV = "pv"
    EMU = "emu"  # emulated on Unicorn with HVM event semantics


class Capability(enum.Flag):
    """Optional backend operations and event sources."""

    NONE = 0
    PAUSE_VCPU = enum.auto()  # pause_vcpu/unpause_vcpu while others run
    WRITE_REGISTERS = enum.auto()  # set_registers
    FPU_REGISTERS = enum.auto()  # st0-7, xmm0-15, mxcsr … in get/set_registers
    SOFTWARE_BREAKPOINT = enum.auto()  # int3 reported as SOFTWARE_BREAKPOINT events
    SINGLESTEP = enum.auto()  # hypervisor single-step (Xen: MTF) via set_singlestep
    DEBUG_EXCEPTION = enum.auto()  # #DB reported as DEBUG_EXCEPTION events (TF, DR hits)
    DEBUG_REGISTERS = enum.auto()  # dr0-3/dr7 breakpoints and watchpoints raise #DB
    MEM_ACCESS = enum.auto()  # per-page access rights, MEM_ACCESS events
    WRITE_CTRLREG = enum.auto()  # CR0/CR3/CR4 write events
    MOV_TO_MSR = enum.auto()  # MSR write events
    CPUID = enum.auto()  # CPUID events
    INJECT_TRAP = enum.auto()  # inject_trap: re-inject an exception into the guest


class Access(enum.Flag):
    """Memory access kinds, for page rights and for MEM_ACCESS events."""

    NONE = 0
    R = enum.auto()
    W = enum.auto()
    X = enum.auto()
    RW = R | W
    RX = R | X
    WX = W | X
    RWX = R | W | X


class EventKind(enum.Enum):
    """Event reasons, named after Xen's VM_EVENT_REASON_*."""

    SOFTWARE_BREAKPOINT = "software_breakpoint"  # int3; rip is the int3's address
    SINGLESTEP = "singlestep"  # one instruction retired under set_singlestep
    DEBUG_EXCEPTION = "debug_exception"  # #DB: TF step or a DR breakpoint/watchpoint
    MEM_ACCESS = "mem_access"  # access forbidden by set_mem_access; before it happens
    WRITE_CTRLREG = "write_ctrlreg"  # mov to CR0/CR3/CR4; before it takes effect
    MOV_TO_MSR = "mov_to_msr"
    CPUID = "cpuid"


@dataclass(frozen=True, slots=True)
class Event:
    """One event.  The vCPU ``vcpu`` is paused until the event is answered."""

    kind: EventKind
    vcpu: int
    rip: int
    # SOFTWARE_BREAKPOINT: length of the trapping instruction (1 for 0xCC).
    insn_length: int = 0
    # MEM_ACCESS: guest-physical and guest-linear address, and what was tried.
    gpa: int | None = None
    gla: int | None = None
    access: Access = Access.NONE
    # WRITE_CTRLREG / MOV_TO_MSR: register index (CR number or MSR), values.
    index: int | None = None
    old_value: int | None = None
    new_value: int | None = None
    # DEBUG_EXCEPTION: the pending DR6 bits (B0-B3, BS).
    dr6: int | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """How to resume a vCPU paused by an event (Xen's vm_event response flags).

    ``allow``: MEM_ACCESS — False completes the instruction without its write
    (VM_EVENT_FLAG_EMULATE_NOWRITE), True lets it happen once (VM_EVENT_FLAG_EMULATE)
    while the page keeps its rights; WRITE_CTRLREG / MOV_TO_MSR — False drops the
    write (VM_EVENT_FLAG_DENY).
    ``reinject``: SOFTWARE_BREAKPOINT / DEBUG_EXCEPTION — deliver the trap to the
    guest as if nobody had watched.
    ``registers``: written before the vCPU resumes (VM_EVENT_FLAG_SET_REGISTERS).
    ``singlestep``: if not None, turn hypervisor single-step on/off for the vCPU
    (VM_EVENT_FLAG_TOGGLE_SINGLESTEP); needs Capability.SINGLESTEP.
    """

    allow: bool = True
    reinject: bool = False
    registers: Mapping[str, int] = field(default_factory=dict)
    singlestep: bool | None = None


class Domain(ABC):
    """One guest domain as seen from outside.  Not thread-safe: one caller at a time,
    except ``event_fd`` readiness which may be watched from an event loop."""

    # -- identity ---------------------------------------------------------
    domid: int
    name: str
    guest_type: GuestType
    word_size: int  # 8 for a 64-bit guest, 4 for a 32-bit one
    vcpu_count: int
    capabilities: Capability

    def require(self, cap: Capability, op: str) -> None:
        """Raise Unsupported unless every flag of ``cap`` is offered."""
        if cap & ~self.capabilities:
            raise Unsupported(op, f"{self.guest_type} backend lacks {cap}")

    # -- run control ------------------------------------------------------
    @abstractmethod
    def pause(self) -> None:
        """Stop every vCPU (nesting count +1).  Returns once none executes guest code."""

    @abstractmethod
    def unpause(self) -> None:
        """Undo one ``pause``.  BackendError if the domain is not paused by us."""

    @property
    @abstractmethod
    def paused(self) -> bool:
        """True while our pause count is non-zero."""

    def pause_vcpu(self, vcpu: int) -> None:
        """Stop one vCPU while the others run (Capability.PAUSE_VCPU)."""
        raise Unsupported("pause_vcpu")

    def unpause_vcpu(self, vcpu: int) -> None:
        """Undo ``pause_vcpu`` (Capability.PAUSE_VCPU)."""
        raise Unsupported("unpause_vcpu")

    # -- memory -----------------------------------------------------------
    @abstractmethod
    def read_phys(self, gpa: int, size: int) -> bytes:
        """Read guest-physical memory.  GuestMemoryFault(first bad address) if any
        byte of the range has no backing; nothing partial is returned."""

    @abstractmethod
    def write_phys(self, gpa: int, data: bytes) -> None:
        """Write guest-physical memory.  GuestMemoryFault before anything is written
        if any byte of the range has no backing."""

    # -- registers --------------------------------------------------------
    @abstractmethod
    def get_registers(self, vcpu: int) -> dict[str, int]:
        """Canonical register name → value for a stopped vCPU.  BackendError if the
        vCPU is running, IndexError-free: a bad vcpu raises XendbgError."""

    @abstractmethod
    def set_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        """Write some registers of a stopped vCPU (Capability.WRITE_REGISTERS).
        Unknown names raise XendbgError and nothing is written."""

    # -- events -----------------------------------------------------------
    def monitor(self, kind: EventKind, enable: bool, *, index: int | None = None) -> None:
        """Turn an event source on or off (Xen's xc_monitor_*).  ``index`` picks
        the control register for WRITE_CTRLREG.  Unsupported if not offered."""
        raise Unsupported(f"monitor {kind.value}")

    def set_singlestep(self, vcpu: int, enable: bool) -> None:
        """Hypervisor single-step of one vCPU (Capability.SINGLESTEP)."""
        raise Unsupported("set_singlestep")

    def set_mem_access(self, gfn: int, access: Access) -> None:
        """Allow only ``access`` on guest frame ``gfn`` (Capability.MEM_ACCESS).
        Access.RWX restores the default.  Forbidden accesses raise MEM_ACCESS events."""
        raise Unsupported("set_mem_access")

    def get_mem_access(self, gfn: int) -> Access:
        """Current rights of guest frame ``gfn`` (Capability.MEM_ACCESS)."""
        raise Unsupported("get_mem_access")

    def inject_trap(self, vcpu: int, vector: int, error_code: int | None = None) -> None:
        """Deliver an exception to a stopped vCPU when it next runs (Capability.INJECT_TRAP)."""
        raise Unsupported("inject_trap")

    @abstractmethod
    def event_fd(self) -> int:
        """A file descriptor that becomes readable when ``poll_event`` has something."""

    @abstractmethod
    def poll_event(self, timeout: float | None = 0.0) -> Event | None:
        """Next pending event, waiting up to ``timeout`` seconds (None: forever)."""

    @abstractmethod
    def resume(self, event: Event, response: Response | None = None) -> None:
        """Answer ``event``: its vCPU continues (if the domain is not paused)."""

    # -- lifetime ---------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Detach: disable every event source, restore page rights, answer pending
        events, drop our pauses so the domain runs as before.  Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
