"""Why the guest stopped, in terms a debugger front-end reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass

SIGINT = 2
SIGTRAP = 5
SIGSEGV = 11


class StopReason(enum.Enum):
    ATTACH = "attach"  # the debugger attached and paused the domain
    SW_BREAKPOINT = "swbreak"
    HW_BREAKPOINT = "hwbreak"
    WATCHPOINT = "watch"
    STEP = "step"
    INTERRUPT = "interrupt"  # Ctrl-C / explicit interrupt request
    CRASHED = "crashed"  # the vCPU cannot run any more (emulation error, triple fault)


class WatchKind(enum.Enum):
    WRITE = "watch"  # GDB's Z2
    READ = "rwatch"  # Z3
    ACCESS = "awatch"  # Z4


@dataclass(frozen=True, slots=True)
class Stop:
    vcpu: int
    reason: StopReason
    pc: int
    watch_kind: WatchKind | None = None
    watch_addr: int | None = None
    detail: str = ""

    @property
    def signal(self) -> int:
        if self.reason is StopReason.INTERRUPT:
            return SIGINT
        if self.reason is StopReason.CRASHED:
            return SIGSEGV
        return SIGTRAP
