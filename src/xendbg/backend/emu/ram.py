"""Guest RAM shared by every vCPU of an emulated domain.

One anonymous mapping backs guest-physical ``[0, size)``; each vCPU's Unicorn
instance maps it with ``mem_map_ptr`` so a store by one vCPU is seen by all.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

from xendbg.errors import GuestMemoryFault

PAGE_SIZE = 0x1000
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class GuestRam:
    """Bounds-checked access to guest-physical memory (no partial transfers)."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size:#x} is not a positive multiple of 4 KiB")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        # The host address Unicorn maps; the ctypes view pins the mapping.
        self._cbuf = (ctypes.c_char * size).from_buffer(self._map)
        self.host_address = ctypes.addressof(self._cbuf)

    def check(self, gpa: int, size: int) -> None:
        """GuestMemoryFault at the first byte of ``[gpa, gpa+size)`` outside RAM."""
        if size < 0:
            raise GuestMemoryFault(gpa, "negative size")
        if size == 0:
            return
        if gpa < 0 or gpa >= self.size:
            raise GuestMemoryFault(gpa, "outside guest RAM")
        if gpa + size > self.size:
            raise GuestMemoryFault(self.size, "outside guest RAM")

    def read(self, gpa: int, size: int) -> bytes:
        self.check(gpa, size)
        return bytes(self.view[gpa : gpa + size])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.check(gpa, len(data))
        self.view[gpa : gpa + len(data)] = data

    def u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        value: int = _U64.unpack_from(self._map, gpa)[0]
        return value

    def u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        value: int = _U32.unpack_from(self._map, gpa)[0]
        return value

    def close(self) -> None:
        """Release the mapping once no Unicorn instance uses it any more."""
        del self._cbuf
        try:
            self.view.release()
            self._map.close()
        except BufferError:  # a slice is still alive somewhere; the GC frees it later
            pass
