"""ctypes bindings of libxenevtchn: the event channel that signals the vm_event ring.

Reading a notification: ``pending()`` returns the port that fired (and reads it
from the fd), ``unmask(port)`` lets the next one through (seed 000, "Reading
from the ring buffer").  ``notify(port)`` tells Xen responses are on the ring.
"""

from __future__ import annotations

from ctypes import c_int, c_uint, c_uint32, c_void_p

from xendbg.backend.xen._lib import (
    XENEVTCHN_SONAMES,
    XenNotAvailable,
    XtlLogger,
    check,
    declare,
    load,
)
from xendbg.errors import BackendError


class EventChannel:
    """An open ``xenevtchn_handle``."""

    def __init__(self, logger: XtlLogger | None = None) -> None:
        lib = self._lib = load(XENEVTCHN_SONAMES, "libxenevtchn")
        p = c_void_p
        declare(lib, "xenevtchn_open", p, p, c_uint)
        declare(lib, "xenevtchn_close", c_int, p)
        declare(lib, "xenevtchn_fd", c_int, p)
        declare(lib, "xenevtchn_notify", c_int, p, c_uint32)
        declare(lib, "xenevtchn_bind_interdomain", c_int, p, c_uint32, c_uint32)
        declare(lib, "xenevtchn_unbind", c_int, p, c_uint32)
        declare(lib, "xenevtchn_pending", c_int, p)
        declare(lib, "xenevtchn_unmask", c_int, p, c_uint32)
        handle = lib.xenevtchn_open(logger.ptr if logger else None, 0)
        if not handle:
            raise XenNotAvailable("xenevtchn_open failed (no /dev/xen/evtchn?)")
        self.handle: int | None = handle

    def _call(self, name: str, *args: object) -> int:
        if self.handle is None:
            raise BackendError(name, 0, "event channel handle is closed")
        return check(name, getattr(self._lib, name)(self.handle, *args))

    def fd(self) -> int:
        return self._call("xenevtchn_fd")

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """The local port bound to ``remote_port`` of ``domid``."""
        return self._call("xenevtchn_bind_interdomain", domid, remote_port)

    def unbind(self, port: int) -> None:
        self._call("xenevtchn_unbind", port)

    def pending(self) -> int:
        """The next port that fired (blocks unless the fd is readable)."""
        return self._call("xenevtchn_pending")

    def unmask(self, port: int) -> None:
        self._call("xenevtchn_unmask", port)

    def notify(self, port: int) -> None:
        self._call("xenevtchn_notify", port)

    def close(self) -> None:
        if self.handle is not None:
            self._lib.xenevtchn_close(self.handle)
            self.handle = None
