"""Hardware breakpoints and watchpoints in DR0-DR3/DR7, the same on every vCPU.

The engine owns the four slots; each user request takes one slot per aligned
piece (a 6-byte watch at an odd address may take three).  Slots are written to
every vCPU because GDB's breakpoints are per address space, not per thread.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from xendbg.arch.x86 import debugregs
from xendbg.arch.x86.debugregs import RW
from xendbg.backend.base import Domain
from xendbg.engine.stops import WatchKind
from xendbg.errors import Unsupported


class HwKind(enum.Enum):
    EXEC = RW.EXECUTE
    WRITE = RW.WRITE
    ACCESS = RW.ACCESS  # x86 has no read-only data breakpoint


@dataclass(frozen=True, slots=True)
class HwRequest:
    kind: HwKind
    addr: int
    length: int
    watch: WatchKind | None = None  # what to report for a data breakpoint


@dataclass(frozen=True, slots=True)
class HwHit:
    kind: HwKind
    addr: int
    watch: WatchKind | None


class DebugRegisters:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.max_len = 8 if domain.word_size == 8 else 4
        self._slots: list[tuple[HwRequest, int, int] | None] = [None] * debugregs.NUM_SLOTS
        self._saved: dict[int, dict[str, int]] = {}  # vcpu → guest's own DRs
        # Slots change often while stopped (gdb re-inserts every breakpoint around
        # each step); the vCPUs only need them when they run: see sync().
        self._dirty = False

    def free(self) -> int:
        return sum(s is None for s in self._slots)

    def _pieces(self, addr: int, length: int) -> list[tuple[int, int]]:
        return debugregs.split_range(addr, length, max_len=self.max_len, slots=None)

    def fits(self, addr: int, length: int) -> bool:
        return len(self._pieces(addr, length)) <= self.free()

    def insert(
        self, kind: HwKind, addr: int, length: int, *, watch: WatchKind | None = None
    ) -> None:
        req = HwRequest(kind, addr, length, watch)
        if any(s is not None and s[0] == req for s in self._slots):
            return
        pieces = [(addr, 1)] if kind is HwKind.EXEC else self._pieces(addr, length)
        if len(pieces) > self.free():
            raise Unsupported("hardware breakpoint", "not enough free debug registers")
        for piece_addr, piece_len in pieces:
            n = self._slots.index(None)
            self._slots[n] = (req, piece_addr, piece_len)
        self._dirty = True

    def remove(self, kind: HwKind, addr: int, length: int) -> bool:
        return self._remove(lambda r: (r.kind, r.addr, r.length) == (kind, addr, length))

    def remove_watch(self, watch: WatchKind, addr: int, length: int) -> bool:
        return self._remove(lambda r: (r.watch, r.addr, r.length) == (watch, addr, length))

    def _remove(self, pred: Callable[[HwRequest], bool]) -> bool:
        found = False
        for n, s in enumerate(self._slots):
            if s is not None and pred(s[0]):
                self._slots[n] = None
                found = True
        if found:
            self._dirty = True
        return found

    def sync(self) -> None:
        """Write pending slot changes to the vCPUs (call before they run)."""
        if self._dirty:
            self._apply()

    def clear(self) -> None:
        """Drop every slot and give the guest its own DRs back, now."""
        self._slots = [None] * debugregs.NUM_SLOTS
        if self._saved or self._dirty:
            self._apply()

    def hit(self, dr6: int) -> HwHit | None:
        """The request whose slot fired according to ``dr6``."""
        for n in debugregs.triggered(dr6):
            s = self._slots[n]
            if s is not None:
                req, piece_addr, _ = s
                addr = piece_addr if req.kind is not HwKind.EXEC else req.addr
                return HwHit(req.kind, addr if req.watch is None else req.addr, req.watch)
        return None

    def _apply(self) -> None:
        """Load our slots into every vCPU; the guest's own DRs come back when we hold none."""
        self._dirty = False
        in_use = any(s is not None for s in self._slots)
        for v in range(self.domain.vcpu_count):
            if not in_use:
                saved = self._saved.pop(v, None)
                if saved is not None:
                    self.domain.set_registers(v, saved)
                continue
            if v not in self._saved:
                regs = self.domain.get_registers(v)
                self._saved[v] = {f"dr{i}": regs[f"dr{i}"] for i in (0, 1, 2, 3, 7)}
            dr7 = debugregs.DR7_INIT | debugregs.DR7_LE
            values: dict[str, int] = {}
            for n, s in enumerate(self._slots):
                if s is None:
                    values[f"dr{n}"] = 0
                    continue
                req, piece_addr, piece_len = s
                values[f"dr{n}"] = piece_addr
                dr7 = debugregs.arm(dr7, n, req.kind.value, piece_len)
            values["dr7"] = dr7
            self.domain.set_registers(v, values)
