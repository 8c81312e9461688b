"""Unicorn C functions its Python binding (2.1.4) does not wrap.

``uc_vmem_read`` (Unicorn >= 2.1.4) reads guest-*linear* memory through the
vCPU's own MMU, as an access of the given kind at the current privilege level:
one C call instead of a page walk in Python.  It probes the TLB like the access
would (QEMU ``tlb_vaddr_to_host``, probe mode), so it can set Accessed bits the
access itself would set; it never raises a guest exception, and no Unicorn hook
fires (the page walk uses QEMU's physical accessors).  Use it only for accesses
the vCPU is about to make anyway (the instruction at RIP).
"""

from __future__ import annotations

import ctypes

from unicorn import UC_PROT_EXEC
from unicorn.unicorn_py3.unicorn import Uc, uclib

_vmem_read = getattr(uclib, "uc_vmem_read", None)
if _vmem_read is not None:
    _vmem_read = uclib["uc_vmem_read"]  # a private function object: argtypes set here only
    _vmem_read.restype = ctypes.c_int
    _vmem_read.argtypes = (
        ctypes.c_void_p,  # uc_engine *
        ctypes.c_uint64,  # address
        ctypes.c_int,  # uc_prot
        ctypes.c_void_p,  # void *bytes
        ctypes.c_size_t,  # size
    )

HAVE_VMEM_READ = _vmem_read is not None


class InstructionFetch:
    """Reads the byte an instruction fetch at a linear address would get."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._byte = ctypes.c_uint8()
        self._ptr = ctypes.addressof(self._byte)

    def byte(self, linear: int) -> int | None:
        """The byte at ``linear``, or None if the TLB probe found no RAM page to read
        (unmapped, or an entry QEMU treats as I/O): then ask the page tables instead.

        Only valid when ``HAVE_VMEM_READ``.
        """
        assert _vmem_read is not None
        if _vmem_read(self._uc._uch, linear, UC_PROT_EXEC, self._ptr, 1):
            return None
        return self._byte.value
