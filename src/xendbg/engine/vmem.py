"""Guest-virtual memory access through our own page walk (arch/x86/paging).

Each access uses the page tables of the vCPU it is made for (its CR3, CR0, CR4,
EFER), never vCPU 0's for everyone.  Reads pass through ``shadow`` so that the
debugger's own int3 bytes never show; writes pass through ``on_write`` so that
a write over a planted breakpoint updates the saved original byte instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from xendbg.arch.x86.paging import PagingContext
from xendbg.arch.x86.tlb import Mmu
from xendbg.backend.base import Domain
from xendbg.errors import GuestMemoryFault

# (gpa, data) -> None: patch ``data`` (read from gpa) in place.
ShadowFn = Callable[[int, bytearray], None]
# (gpa, data) -> bytes to really write at gpa.
WriteFilter = Callable[[int, bytes], bytes]


class VirtualMemory:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.mmu = Mmu(domain.read_phys)
        self.shadow: ShadowFn | None = None
        self.write_filter: WriteFilter | None = None

    @staticmethod
    def context(regs: Mapping[str, int]) -> PagingContext:
        return PagingContext.from_registers(regs)

    def invalidate(self) -> None:
        """Forget cached translations (the guest ran, its tables may differ)."""
        self.mmu.invalidate()

    def translate(self, ctx: PagingContext, addr: int) -> int:
        return self.mmu.translate(ctx, addr).gpa

    def chunks(self, ctx: PagingContext, addr: int, size: int) -> list[tuple[int, int]]:
        """(gpa, length) pieces of a linear range; PageFault if any page is unmapped."""
        return self.mmu.translate_range(ctx, addr, size)

    def read(self, ctx: PagingContext, addr: int, size: int) -> bytes:
        """All ``size`` bytes or GuestMemoryFault."""
        out = bytearray()
        for gpa, n in self.chunks(ctx, addr, size):
            piece = bytearray(self.domain.read_phys(gpa, n))
            if self.shadow is not None:
                self.shadow(gpa, piece)
            out += piece
        return bytes(out)

    def read_partial(self, ctx: PagingContext, addr: int, size: int) -> bytes:
        """As many leading bytes as are readable (GDB's ``m`` may return fewer)."""
        out = bytearray()
        while size > 0:
            n = min(size, 0x1000 - (addr & 0xFFF))
            try:
                out += self.read(ctx, addr, n)
            except GuestMemoryFault:
                if not out:
                    raise
                break
            addr += n
            size -= n
        return bytes(out)

    def write(self, ctx: PagingContext, addr: int, data: bytes) -> None:
        """Write all of ``data`` or nothing: every page is translated first."""
        pieces = self.chunks(ctx, addr, len(data))
        off = 0
        for gpa, n in pieces:
            piece = data[off : off + n]
            if self.write_filter is not None:
                piece = self.write_filter(gpa, piece)
            self.domain.write_phys(gpa, piece)
            off += n
