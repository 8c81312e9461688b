"""Software breakpoints: int3 bytes planted in guest memory, hidden from readers.

Breakpoints are keyed by the guest-physical address of their byte, so a read
through any mapping of that page (or a physical read) is shadowed alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from xendbg.backend.base import Domain

INT3 = 0xCC


@dataclass(slots=True)
class SwBreakpoint:
    addr: int  # linear address the user asked for
    gpa: int
    original: int  # the guest's own byte, restored on removal
    planted: bool = True


class SoftwareBreakpoints:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._by_addr: dict[int, SwBreakpoint] = {}
        self._by_gpa: dict[int, SwBreakpoint] = {}

    def __contains__(self, addr: int) -> bool:
        return addr in self._by_addr

    def __len__(self) -> int:
        return len(self._by_addr)

    def addresses(self) -> list[int]:
        return sorted(self._by_addr)

    def insert(self, addr: int, gpa: int) -> None:
        """Plant an int3 at linear ``addr`` (whose byte lives at ``gpa``).  Idempotent."""
        if addr in self._by_addr:
            return
        shared = self._by_gpa.get(gpa)
        if shared is not None:
            # Another linear alias of the same byte: the int3 is already there.
            bp = SwBreakpoint(addr, gpa, shared.original, planted=shared.planted)
        else:
            original = self.domain.read_phys(gpa, 1)[0]
            self.domain.write_phys(gpa, bytes([INT3]))
            bp = SwBreakpoint(addr, gpa, original)
            self._by_gpa[gpa] = bp
        self._by_addr[addr] = bp

    def remove(self, addr: int) -> bool:
        """Restore the guest's byte.  False if there was no breakpoint at ``addr``."""
        bp = self._by_addr.pop(addr, None)
        if bp is None:
            return False
        if any(other.gpa == bp.gpa for other in self._by_addr.values()):
            return True
        owner = self._by_gpa.pop(bp.gpa)
        if owner.planted:
            self.domain.write_phys(bp.gpa, bytes([owner.original]))
        return True

    def remove_all(self) -> None:
        for addr in list(self._by_addr):
            self.remove(addr)

    def lift(self, addr: int) -> int | None:
        """Temporarily restore the original byte (to step over it); returns the gpa."""
        bp = self._by_addr.get(addr)
        if bp is None:
            return None
        owner = self._by_gpa[bp.gpa]
        if owner.planted:
            self.domain.write_phys(owner.gpa, bytes([owner.original]))
            owner.planted = False
        return owner.gpa

    def replant(self, gpa: int) -> None:
        owner = self._by_gpa.get(gpa)
        if owner is not None and not owner.planted:
            self.domain.write_phys(gpa, bytes([INT3]))
            owner.planted = True

    def owns(self, gpa: int) -> bool:
        """Is the int3 at ``gpa`` one of ours (as opposed to the guest's own)?"""
        bp = self._by_gpa.get(gpa)
        return bp is not None and bp.planted

    # -- memory filters (installed into VirtualMemory) ----------------------
    def shadow(self, gpa: int, data: bytearray) -> None:
        """Show the guest's bytes where we planted int3s."""
        if not self._by_gpa:
            return
        end = gpa + len(data)
        for bp_gpa, bp in self._by_gpa.items():
            if gpa <= bp_gpa < end and bp.planted:
                data[bp_gpa - gpa] = bp.original

    def write_filter(self, gpa: int, data: bytes) -> bytes:
        """A write over a planted int3 updates the saved byte and keeps the int3."""
        if not self._by_gpa:
            return data
        end = gpa + len(data)
        out: bytearray | None = None
        for bp_gpa, bp in self._by_gpa.items():
            if gpa <= bp_gpa < end:
                bp.original = data[bp_gpa - gpa]
                if bp.planted:
                    if out is None:
                        out = bytearray(data)
                    out[bp_gpa - gpa] = INT3
        return data if out is None else bytes(out)
