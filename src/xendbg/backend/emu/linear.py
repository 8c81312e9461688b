"""Guest-linear memory of one vCPU, translated through its current page tables.

Used by the backend itself (interrupt delivery, instruction scans, HLT and int3
checks), always from the thread that owns the vCPU's Unicorn instance.  Walks
never set Accessed/Dirty bits (``xendbg.arch.x86.paging``).
"""

from __future__ import annotations

from collections.abc import Callable

from xendbg.arch.x86.paging import PagingContext, walk, walk_range
from xendbg.backend.emu.ram import GuestRam


class LinearMemory:
    def __init__(self, ram: GuestRam, context: Callable[[], PagingContext]) -> None:
        self._ram = ram
        self._context = context

    def translate(self, linear: int) -> int:
        """Guest-physical address of ``linear``; PageFault (a GuestMemoryFault) if unmapped."""
        return walk(self._ram.read, self._context(), linear).gpa

    def read(self, linear: int, size: int) -> bytes:
        chunks = walk_range(self._ram.read, self._context(), linear, size)
        return b"".join(self._ram.read(gpa, n) for gpa, n in chunks)

    def write(self, linear: int, data: bytes) -> list[tuple[int, int]]:
        """Write ``data``; returns the (gpa, length) chunks written."""
        chunks = walk_range(self._ram.read, self._context(), linear, len(data))
        for gpa, _ in chunks:
            self._ram.check(gpa, 1)
        done = 0
        for gpa, n in chunks:
            self._ram.write(gpa, data[done : done + n])
            done += n
        return chunks
