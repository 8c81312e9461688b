"""ctypes bindings of libxenforeignmemory: mapping guest frames into our address space.

``xenforeignmemory_map`` takes guest frame numbers (for PV guests: machine frame
numbers, the frames their page tables hold) and reports one errno per page in
its ``err`` array: a page may fail while its neighbours map (seed 000,
"Memory I/O").
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence
from ctypes import POINTER, c_int, c_size_t, c_uint32, c_ulong, c_void_p

from xendbg.backend.xen._lib import (
    XENFOREIGNMEMORY_SONAMES,
    XenNotAvailable,
    XtlLogger,
    check,
    declare,
    load,
)
from xendbg.errors import BackendError

PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE


class ForeignMapping:
    """Pages mapped by one ``xenforeignmemory_map`` call, with their errors."""

    def __init__(self, fmem: ForeignMemory, addr: int, errors: list[int]) -> None:
        self._fmem = fmem
        self.addr = addr
        self.errors = errors  # one errno (positive) per page, 0 where it mapped

    def read(self, offset: int, size: int) -> bytes:
        return ctypes.string_at(self.addr + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        ctypes.memmove(self.addr + offset, data, len(data))

    def close(self) -> None:
        if self.addr:
            self._fmem.unmap(self.addr, len(self.errors))
            self.addr = 0

    def __enter__(self) -> ForeignMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ForeignMemory:
    """An open ``xenforeignmemory_handle``."""

    def __init__(self, logger: XtlLogger | None = None) -> None:
        lib = self._lib = load(XENFOREIGNMEMORY_SONAMES, "libxenforeignmemory")
        p = c_void_p
        declare(lib, "xenforeignmemory_open", p, p, ctypes.c_uint)
        declare(lib, "xenforeignmemory_close", c_int, p)
        declare(lib, "xenforeignmemory_map", p, p, c_uint32, c_int, c_size_t, p, POINTER(c_int))
        declare(lib, "xenforeignmemory_unmap", c_int, p, p, c_size_t)
        handle = lib.xenforeignmemory_open(logger.ptr if logger else None, 0)
        if not handle:
            raise XenNotAvailable("xenforeignmemory_open failed (no /dev/xen/privcmd?)")
        self.handle: int | None = handle

    def map(self, domid: int, prot: int, frames: Sequence[int]) -> ForeignMapping:
        """Map ``frames`` contiguously.  Per-page errors are in ``Mapping.errors``."""
        if self.handle is None:
            raise BackendError("xenforeignmemory_map", 0, "handle is closed")
        n = len(frames)
        arr = (c_ulong * n)(*frames)  # xen_pfn_t is unsigned long on x86
        err = (c_int * n)()
        addr = self._lib.xenforeignmemory_map(self.handle, domid, prot, n, arr, err)
        if not addr:
            # The whole call failed; errno says why.  Per-page errors may be set too.
            errors = [abs(e) for e in err]
            if any(errors):
                return ForeignMapping(self, 0, errors)
            check("xenforeignmemory_map", -1)
        return ForeignMapping(self, addr, [abs(e) for e in err])

    def unmap(self, addr: int, pages: int) -> None:
        if self.handle is not None:
            check(
                "xenforeignmemory_unmap", self._lib.xenforeignmemory_unmap(self.handle, addr, pages)
            )

    def close(self) -> None:
        if self.handle is not None:
            self._lib.xenforeignmemory_close(self.handle)
            self.handle = None
