"""Spin breakpoints: ``jmp $`` (EB FE) planted in guest memory, found by vCPU RIP.

Where no trap reaches the debugger (a Xen PV guest: Xen without CONFIG_GDBSX
drops its int3 and #DB), a breakpoint can still be a place a vCPU cannot
leave: ``jmp $`` jumps to itself forever, with RIP on its own first byte.
The engine polls the vCPUs' RIPs and calls a vCPU *parked* when its RIP
translates to the first byte of a planted patch; restoring the two bytes then
lets that vCPU carry on exactly where it was, as if it had just arrived.

A patch is two bytes.  When the instruction at the address is one byte long
(``ret``, ``push %rbp``), the second byte belongs to the next instruction: a
vCPU that reaches that byte without passing the first (a jump to it, or a
vCPU already standing there) would execute FE … — a different instruction.
The engine steps vCPUs standing inside a patch out of it before they run;
code paths that jump to the second byte while the patch is planted are a
residual risk of this strategy that no polling can remove.

Patches are keyed by the guest-physical addresses of their two bytes (the
second may live on another frame when the first ends a page), so reads of any
mapping of those frames are shadowed alike.  Two planted patches never share
a byte: a user breakpoint that would overlap another one is refused; the
engine's temporary patches (software single-step) lift the user patches they
overlap for the length of the step.  Invariant: a byte is in ``_shown`` (with
the guest's value) exactly while a planted patch covers it in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xendbg.backend.base import Domain
from xendbg.errors import Unsupported

JMP_SELF = b"\xeb\xfe"  # JMP rel8 -2: jump to its own first byte
PATCH_LENGTH = len(JMP_SELF)

Gpas = tuple[int, int]  # guest-physical address of each byte of a patch


@dataclass(slots=True, eq=False)
class SpinPatch:
    gpas: Gpas
    users: set[int] = field(default_factory=set)  # linear addresses of user breakpoints
    temp: int = 0  # holds by the engine (software-step successors, frozen vCPUs)
    planted: bool = False

    @property
    def wanted(self) -> bool:
        return bool(self.users) or self.temp > 0

    @property
    def start(self) -> int:
        return self.gpas[0]


class SpinBreakpoints:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._patches: dict[Gpas, SpinPatch] = {}
        self._by_addr: dict[int, SpinPatch] = {}  # user breakpoints by linear address
        self._starts: dict[int, SpinPatch] = {}  # gpa of first byte -> planted patch
        self._shown: dict[int, int] = {}  # patched byte's gpa -> the guest's byte

    # -- queries -----------------------------------------------------------
    def __contains__(self, addr: int) -> bool:
        return addr in self._by_addr

    def __len__(self) -> int:
        return len(self._by_addr)

    def addresses(self) -> list[int]:
        return sorted(self._by_addr)

    @property
    def active(self) -> bool:
        """Is any patch in memory (so that vCPUs may park)?"""
        return bool(self._shown)

    def parked_patch(self, gpas: Gpas) -> SpinPatch | None:
        """The planted patch a vCPU whose RIP bytes live at ``gpas`` spins on, if any."""
        p = self._starts.get(gpas[0])
        return p if p is not None and p.gpas == gpas else None

    def is_breakpoint(self, gpas: Gpas) -> bool:
        """Is a user breakpoint planted at ``gpas`` (as opposed to a temporary patch)?"""
        p = self.parked_patch(gpas)
        return p is not None and bool(p.users)

    def patched(self, gpa: int) -> bool:
        """Does memory at ``gpa`` hold one of our bytes right now?"""
        return gpa in self._shown

    def overlapping(self, gpas: set[int]) -> list[SpinPatch]:
        """Planted patches with a byte in ``gpas``."""
        return [p for p in self._starts.values() if gpas.intersection(p.gpas)]

    # -- user breakpoints --------------------------------------------------
    def insert(self, addr: int, gpas: Gpas) -> None:
        """Plant ``jmp $`` at linear ``addr`` (bytes at ``gpas``).  Idempotent;
        Unsupported if it would overlap another breakpoint's patch."""
        if addr in self._by_addr:
            return
        p = self._patches.get(gpas)
        if p is None:
            clash = self._clash(gpas)
            if clash is not None:
                others = ", ".join(f"{a:#x}" for a in sorted(clash.users)) or "a temporary patch"
                raise Unsupported(
                    "spin breakpoint",
                    f"`jmp $` at {addr:#x} takes two bytes and would overlap the one at {others}",
                )
            p = self._patches[gpas] = SpinPatch(gpas)
        p.users.add(addr)
        self._by_addr[addr] = p
        if not p.planted:
            self._plant(p)

    def remove(self, addr: int) -> bool:
        """Restore the guest's bytes.  False if there was no breakpoint at ``addr``."""
        p = self._by_addr.pop(addr, None)
        if p is None:
            return False
        p.users.discard(addr)
        self._release(p)
        return True

    def remove_all(self) -> None:
        """Every patch, user and temporary, out of memory (detach)."""
        self._by_addr.clear()
        for p in list(self._patches.values()):
            p.users.clear()
            p.temp = 0
            self._release(p)

    # -- stepping past patches ---------------------------------------------
    def lift(self, p: SpinPatch) -> bool:
        """Restore ``p``'s bytes for a while; True if it was planted."""
        if not p.planted:
            return False
        self._unplant(p)
        return True

    def replant(self, p: SpinPatch) -> None:
        """Undo ``lift`` if ``p`` is still wanted."""
        if p.wanted and not p.planted and self._patches.get(p.gpas) is p:
            self._plant(p)

    def hold(self, gpas: Gpas) -> tuple[SpinPatch, list[SpinPatch]]:
        """A temporary patch at ``gpas`` for the engine (shared with a user breakpoint
        there).  User patches it overlaps are lifted and returned, for the caller
        to replant after ``release_hold``; Unsupported if it overlaps another
        temporary patch."""
        p = self._patches.get(gpas)
        if p is not None and p.planted:
            p.temp += 1
            return p, []
        clash = self._clash(gpas)
        lifted: list[SpinPatch] = []
        while clash is not None:
            if clash.temp:
                raise Unsupported(
                    "software single-step", "two of its `jmp $` patches would share a byte"
                )
            self._unplant(clash)
            lifted.append(clash)
            clash = self._clash(gpas)
        if p is None:
            p = self._patches[gpas] = SpinPatch(gpas)
        p.temp += 1
        self._plant(p)
        return p, lifted

    def release_hold(self, p: SpinPatch) -> None:
        p.temp = max(0, p.temp - 1)
        self._release(p)

    # -- memory filters (installed into VirtualMemory) ----------------------
    def shadow(self, gpa: int, data: bytearray) -> None:
        """Show the guest's bytes where our patches are."""
        if not self._shown:
            return
        end = gpa + len(data)
        for b, original in self._shown.items():
            if gpa <= b < end:
                data[b - gpa] = original

    def write_filter(self, gpa: int, data: bytes) -> bytes:
        """A write over a patch updates the saved bytes and keeps the patch."""
        if not self._shown:
            return data
        end = gpa + len(data)
        out: bytearray | None = None
        for p in self._starts.values():
            for i, b in enumerate(p.gpas):
                if gpa <= b < end:
                    self._shown[b] = data[b - gpa]
                    if out is None:
                        out = bytearray(data)
                    out[b - gpa] = JMP_SELF[i]
        return data if out is None else bytes(out)

    # -- internals ---------------------------------------------------------
    def _clash(self, gpas: Gpas) -> SpinPatch | None:
        """A planted patch other than the one at ``gpas`` sharing a byte with it."""
        for p in self._starts.values():
            if p.gpas != gpas and set(p.gpas).intersection(gpas):
                return p
        return None

    def _release(self, p: SpinPatch) -> None:
        if p.wanted:
            return
        if p.planted:
            self._unplant(p)
        self._patches.pop(p.gpas, None)

    def _plant(self, p: SpinPatch) -> None:
        # The bytes are read now, not at insert time: a lifted patch's bytes are the
        # guest's again and may have been rewritten meanwhile.
        original = [self.domain.read_phys(b, 1)[0] for b in p.gpas]
        self._write(p.gpas, JMP_SELF)
        for b, value in zip(p.gpas, original, strict=True):
            self._shown[b] = value
        p.planted = True
        self._starts[p.start] = p

    def _unplant(self, p: SpinPatch) -> None:
        self._write(p.gpas, bytes(self._shown[b] for b in p.gpas))
        for b in p.gpas:
            del self._shown[b]
        p.planted = False
        del self._starts[p.start]

    def _write(self, gpas: Gpas, data: bytes) -> None:
        if gpas[1] == gpas[0] + 1:  # one write: each may stop every vCPU (emulator)
            self.domain.write_phys(gpas[0], data)
        else:
            for b, value in zip(gpas, data, strict=True):
                self.domain.write_phys(b, bytes([value]))
