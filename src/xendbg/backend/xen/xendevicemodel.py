"""ctypes bindings of libxendevicemodel: injecting exceptions into HVM vCPUs."""

from __future__ import annotations

from ctypes import c_int, c_uint, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

from xendbg.backend.xen._lib import (
    XENDEVICEMODEL_SONAMES,
    XenNotAvailable,
    XtlLogger,
    check,
    declare,
    load,
)
from xendbg.errors import BackendError

# XEN_DMOP_EVENT_* (hvm/dm_op.h), the x86 event types of VMX/SVM injection.
XEN_DMOP_EVENT_hw_exc = 3  # Xen's names
XEN_DMOP_EVENT_sw_int = 4
XEN_DMOP_EVENT_pri_sw_exc = 5  # ICEBP
XEN_DMOP_EVENT_sw_exc = 6  # INT3, INTO
NO_ERROR_CODE = 0xFFFFFFFF  # ~0: the exception pushes no error code


class DeviceModel:
    """An open ``xendevicemodel_handle``."""

    def __init__(self, logger: XtlLogger | None = None) -> None:
        lib = self._lib = load(XENDEVICEMODEL_SONAMES, "libxendevicemodel")
        p = c_void_p
        declare(lib, "xendevicemodel_open", p, p, c_uint)
        declare(lib, "xendevicemodel_close", c_int, p)
        declare(
            lib,
            "xendevicemodel_inject_event",
            c_int,
            p,
            c_uint16,
            c_int,
            c_uint8,
            c_uint8,
            c_uint32,
            c_uint8,
            c_uint64,
        )
        handle = lib.xendevicemodel_open(logger.ptr if logger else None, 0)
        if not handle:
            raise XenNotAvailable("xendevicemodel_open failed")
        self.handle: int | None = handle

    def inject_event(
        self,
        domid: int,
        vcpu: int,
        vector: int,
        event_type: int,
        error_code: int = NO_ERROR_CODE,
        insn_len: int = 0,
        extra: int = 0,
    ) -> None:
        """Queue ``vector`` for ``vcpu``; ``extra`` is CR2 for #PF, pending DR6 bits for #DB."""
        if self.handle is None:
            raise BackendError("xendevicemodel_inject_event", 0, "handle is closed")
        rc = self._lib.xendevicemodel_inject_event(
            self.handle, domid, vcpu, vector, event_type, error_code, insn_len, extra
        )
        check("xendevicemodel_inject_event", rc)

    def close(self) -> None:
        if self.handle is not None:
            self._lib.xendevicemodel_close(self.handle)
            self.handle = None
