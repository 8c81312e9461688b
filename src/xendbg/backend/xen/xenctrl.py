"""ctypes bindings of libxenctrl: domains, vCPU contexts, monitor (vm_event) control.

Only the calls xendbg uses, each checked: a failure raises ``BackendError``
(``DomainGone`` for ESRCH) naming the call and its errno.  docs/xen-api.md
describes every call, its arguments, failure modes and guest types.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, c_bool, c_int, c_uint, c_uint16, c_uint32, c_uint64, c_void_p

from xendbg.backend.xen import structs
from xendbg.backend.xen._lib import (
    XENCTRL_SONAMES,
    XenNotAvailable,
    XtlLogger,
    check,
    check_ptr,
    declare,
    load,
    soname_version,
)
from xendbg.errors import BackendError

XENVER_version = 0  # Xen's name
XENVER_extraversion = 1  # version.h: xen_extraversion_t, char[16]
XENVER_capabilities = 3  # version.h: xen_capabilities_info_t, char[1024]
XEN_EXTRAVERSION_LEN = 16
XEN_CAPABILITIES_INFO_LEN = 1024
XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_OFF = 0
XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON = 1

# Xen's hypercall interface lives here in dom0 (privcmd driver, xenfs).
XEN_DEVICES = ("/dev/xen/privcmd", "/proc/xen/privcmd")


def _prototypes(lib: ctypes.CDLL) -> None:
    u32, u16, p = c_uint32, c_uint16, c_void_p
    declare(lib, "xc_interface_open", p, p, p, c_uint)
    declare(lib, "xc_interface_close", c_int, p)
    declare(lib, "xc_version", c_int, p, c_int, p)
    declare(lib, "xc_domain_getinfolist", c_int, p, u32, c_uint, p)
    declare(lib, "xc_domain_pause", c_int, p, u32)
    declare(lib, "xc_domain_unpause", c_int, p, u32)
    declare(lib, "xc_domain_get_guest_width", c_int, p, u32, POINTER(c_uint))
    declare(lib, "xc_domain_hvm_getcontext", c_int, p, u32, p, u32)
    declare(lib, "xc_domain_hvm_getcontext_partial", c_int, p, u32, u16, u16, p, u32)
    declare(lib, "xc_domain_hvm_setcontext", c_int, p, u32, p, u32)
    declare(lib, "xc_vcpu_getcontext", c_int, p, u32, u32, p)
    declare(lib, "xc_vcpu_setcontext", c_int, p, u32, u32, p)
    declare(lib, "xc_domain_debug_control", c_int, p, u32, u32, u32)
    declare(lib, "xc_set_mem_access", c_int, p, u32, c_int, c_uint64, u32)
    declare(lib, "xc_get_mem_access", c_int, p, u32, c_uint64, POINTER(c_int))
    declare(lib, "xc_monitor_enable", p, p, u32, POINTER(u32))
    declare(lib, "xc_monitor_disable", c_int, p, u32)
    declare(lib, "xc_monitor_get_capabilities", c_int, p, u32, POINTER(u32))
    declare(lib, "xc_monitor_write_ctrlreg", c_int, p, u32, u16, c_bool, c_bool, c_uint64, c_bool)
    declare(lib, "xc_monitor_mov_to_msr", c_int, p, u32, u32, c_bool, c_bool)
    declare(lib, "xc_monitor_singlestep", c_int, p, u32, c_bool)
    declare(lib, "xc_monitor_software_breakpoint", c_int, p, u32, c_bool)
    declare(lib, "xc_monitor_debug_exceptions", c_int, p, u32, c_bool, c_bool)
    declare(lib, "xc_monitor_cpuid", c_int, p, u32, c_bool)
    if hasattr(lib, "xc_vm_event_get_version"):  # Xen 4.13+
        declare(lib, "xc_vm_event_get_version", c_int, p)


class XenCtrl:
    """An open ``xc_interface``.  ``XenNotAvailable`` if Xen is absent."""

    def __init__(self, quiet: bool | None = None) -> None:
        self._lib = load(XENCTRL_SONAMES, "libxenctrl")
        _prototypes(self._lib)
        if quiet is None:
            quiet = not os.environ.get("XENDBG_XEN_VERBOSE")
        self._logger = XtlLogger(quiet)
        xch = self._lib.xc_interface_open(self._logger.ptr, self._logger.ptr, 0)
        if not xch:
            err = ctypes.get_errno()
            self._logger.close()
            missing = [d for d in XEN_DEVICES if not os.path.exists(d)]
            why = f"xc_interface_open failed: {os.strerror(err) if err else 'unknown error'}"
            if len(missing) == len(XEN_DEVICES):
                why += f" ({' and '.join(missing)} missing)"
            raise XenNotAvailable(why)
        self.xch: int | None = xch
        self.lib_version = soname_version(self._lib)

    # -- plumbing -----------------------------------------------------------
    def _call(self, name: str, *args: object) -> int:
        if self.xch is None:
            raise BackendError(name, 0, "xc_interface is closed")
        return check(name, getattr(self._lib, name)(self.xch, *args))

    def close(self) -> None:
        if self.xch is not None:
            self._lib.xc_interface_close(self.xch)
            self.xch = None
            self._logger.close()

    def __enter__(self) -> XenCtrl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hypervisor ---------------------------------------------------------
    def version(self) -> tuple[int, int]:
        """(major, minor) of the running hypervisor (XENVER_version)."""
        v = self._call("xc_version", XENVER_version, None)
        return v >> 16, v & 0xFFFF

    def version_text(self) -> str:
        """The full release, e.g. ``4.17.7`` (XENVER_version + XENVER_extraversion)."""
        major, minor = self.version()
        buf = ctypes.create_string_buffer(XEN_EXTRAVERSION_LEN)
        self._call("xc_version", XENVER_extraversion, buf)
        return f"{major}.{minor}{buf.value.decode(errors='replace')}"

    def capabilities(self) -> str:
        """XENVER_capabilities, e.g. ``xen-3.0-x86_64 hvm-3.0-x86_32 … hvm-3.0-x86_64``."""
        buf = ctypes.create_string_buffer(XEN_CAPABILITIES_INFO_LEN)
        self._call("xc_version", XENVER_capabilities, buf)
        return buf.value.decode(errors="replace")

    def vm_event_version(self) -> int:
        """VM_EVENT_INTERFACE_VERSION of the hypervisor.

        ``xc_vm_event_get_version`` exists from Xen 4.13; before, the version
        follows from the release (4.11: 3, 4.12: 4).
        """
        if hasattr(self._lib, "xc_vm_event_get_version"):
            return self._call("xc_vm_event_get_version")
        release = self.version()
        if release in structs.VM_EVENT_VERSION_BY_XEN:
            return structs.VM_EVENT_VERSION_BY_XEN[release]
        raise BackendError("xc_vm_event_get_version", 0, f"unknown for Xen {release}")

    # -- domains ------------------------------------------------------------
    def domain_info_from(self, first: int, xen_version: tuple[int, int]) -> ctypes.Structure | None:
        """Information on the first existing domain with id >= ``first``, or None.

        One entry per call into a generously sized buffer, so a hypervisor whose
        ``xen_domctl_getdomaininfo`` is larger than ours cannot overrun it.
        """
        cls = structs.domaininfo_type(xen_version)
        buf = ctypes.create_string_buffer(4096)
        n = self._call("xc_domain_getinfolist", first, 1, buf)
        if n == 0:
            return None
        return cls.from_buffer_copy(buf.raw[: ctypes.sizeof(cls)])

    def domain_pause(self, domid: int) -> None:
        self._call("xc_domain_pause", domid)

    def domain_unpause(self, domid: int) -> None:
        self._call("xc_domain_unpause", domid)

    def guest_width(self, domid: int) -> int:
        """Guest width in bytes (4 or 8): the PV address size; 8 for HVM."""
        width = c_uint()
        self._call("xc_domain_get_guest_width", domid, ctypes.byref(width))
        return width.value

    # -- vCPU state -----------------------------------------------------------
    def hvm_getcontext_partial(self, domid: int, typecode: int, instance: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        self._call("xc_domain_hvm_getcontext_partial", domid, typecode, instance, buf, size)
        return buf.raw

    def hvm_getcontext(self, domid: int) -> bytearray:
        """The whole HVM save context: descriptors + records up to END."""
        size = self._call("xc_domain_hvm_getcontext", domid, None, 0)
        buf = ctypes.create_string_buffer(size)
        used = self._call("xc_domain_hvm_getcontext", domid, buf, size)
        return bytearray(buf.raw[: used or size])

    def hvm_setcontext(self, domid: int, blob: bytes | bytearray) -> None:
        buf = ctypes.create_string_buffer(bytes(blob), len(blob))
        self._call("xc_domain_hvm_setcontext", domid, buf, len(blob))

    def vcpu_getcontext(self, domid: int, vcpu: int) -> structs.vcpu_guest_context_any:
        ctxt = structs.vcpu_guest_context_any()
        self._call("xc_vcpu_getcontext", domid, vcpu, ctypes.byref(ctxt))
        return ctxt

    def vcpu_setcontext(self, domid: int, vcpu: int, ctxt: structs.vcpu_guest_context_any) -> None:
        self._call("xc_vcpu_setcontext", domid, vcpu, ctypes.byref(ctxt))

    def debug_control(self, domid: int, op: int, vcpu: int) -> None:
        self._call("xc_domain_debug_control", domid, op, vcpu)

    # -- mem_access -----------------------------------------------------------
    def set_mem_access(self, domid: int, access: int, first_pfn: int, nr: int = 1) -> None:
        self._call("xc_set_mem_access", domid, access, first_pfn, nr)

    def get_mem_access(self, domid: int, pfn: int) -> int:
        access = c_int()
        self._call("xc_get_mem_access", domid, pfn, ctypes.byref(access))
        return access.value

    # -- monitor (vm_event) ---------------------------------------------------
    def monitor_enable(self, domid: int) -> tuple[int, int]:
        """(address of the mapped ring page, remote event channel port)."""
        if self.xch is None:
            raise BackendError("xc_monitor_enable", 0, "xc_interface is closed")
        port = c_uint32()
        ring = self._lib.xc_monitor_enable(self.xch, domid, ctypes.byref(port))
        return check_ptr("xc_monitor_enable", ring), port.value

    def unmap_ring(self, addr: int) -> None:
        """Unmap the ring page ``xc_monitor_enable`` mapped (xen-access munmaps it)."""
        libc = ctypes.CDLL(None, use_errno=True)
        munmap = declare(libc, "munmap", c_int, c_void_p, ctypes.c_size_t)
        if munmap(addr, structs.PAGE_SIZE) != 0:
            check("munmap", -1, "vm_event ring page")

    def monitor_disable(self, domid: int) -> None:
        self._call("xc_monitor_disable", domid)

    def monitor_capabilities(self, domid: int) -> int:
        """Bitmap of 1 << XEN_DOMCTL_MONITOR_EVENT_*."""
        caps = c_uint32()
        self._call("xc_monitor_get_capabilities", domid, ctypes.byref(caps))
        return caps.value

    def monitor_write_ctrlreg(
        self, domid: int, index: int, enable: bool, *, sync: bool = True, onchangeonly: bool = True
    ) -> None:
        self._call("xc_monitor_write_ctrlreg", domid, index, enable, sync, 0, onchangeonly)

    def monitor_mov_to_msr(self, domid: int, msr: int, enable: bool) -> None:
        self._call("xc_monitor_mov_to_msr", domid, msr, enable, True)

    def monitor_singlestep(self, domid: int, enable: bool) -> None:
        self._call("xc_monitor_singlestep", domid, enable)

    def monitor_software_breakpoint(self, domid: int, enable: bool) -> None:
        self._call("xc_monitor_software_breakpoint", domid, enable)

    def monitor_debug_exceptions(self, domid: int, enable: bool, *, sync: bool = True) -> None:
        self._call("xc_monitor_debug_exceptions", domid, enable, sync)

    def monitor_cpuid(self, domid: int, enable: bool) -> None:
        self._call("xc_monitor_cpuid", domid, enable)
