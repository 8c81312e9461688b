"""ctypes bindings of libxenstore: reading domain metadata such as names, and watches.

``xs_read``, ``xs_directory`` and ``xs_check_watch`` return malloc'd memory the
caller frees (seed 000, "Extras — XenStore").

Watches: ``xs_watch(path, token)`` makes xenstored send an event whenever
``path`` (or a child) changes, and once at registration.  The special paths
``@introduceDomain`` and ``@releaseDomain`` fire when a domain is introduced to
xenstored (``xl create``) and when one is released (destroyed, or dying), without
saying which: the listener rescans the domain list.  ``xs_fileno`` is readable
while events are queued; ``xs_check_watch`` takes them one at a time without
blocking (NULL with EAGAIN once none are left).
"""

from __future__ import annotations

import ctypes
import errno as E
from ctypes import POINTER, c_bool, c_char_p, c_int, c_uint, c_ulong, c_void_p

from xendbg.backend.xen._lib import XENSTORE_SONAMES, XenNotAvailable, declare, error_for, load

XBT_NULL = 0  # no transaction
XS_WATCH_PATH = 0  # io/xs_wire.h: indices into a watch event's strings
XS_WATCH_TOKEN = 1
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"


class XenStore:
    """An open ``xs_handle`` (read-only use)."""

    def __init__(self) -> None:
        lib = self._lib = load(XENSTORE_SONAMES, "libxenstore")
        p = c_void_p
        declare(lib, "xs_open", p, c_ulong)
        declare(lib, "xs_close", None, p)
        declare(lib, "xs_read", p, p, c_uint, c_char_p, POINTER(c_uint))
        declare(lib, "xs_directory", p, p, c_uint, c_char_p, POINTER(c_uint))
        declare(lib, "xs_watch", c_bool, p, c_char_p, c_char_p)
        declare(lib, "xs_unwatch", c_bool, p, c_char_p, c_char_p)
        declare(lib, "xs_fileno", c_int, p)
        declare(lib, "xs_check_watch", p, p)
        self._libc = ctypes.CDLL(None)
        declare(self._libc, "free", None, p)
        handle = lib.xs_open(0)
        if not handle:
            raise XenNotAvailable(f"xs_open failed: {ctypes.get_errno()} (is xenstored running?)")
        self.handle: int | None = handle

    def read(self, path: str) -> str | None:
        """The value at ``path``, or None if it does not exist or is unreadable."""
        if self.handle is None:
            return None
        length = c_uint()
        ptr = self._lib.xs_read(self.handle, XBT_NULL, path.encode(), ctypes.byref(length))
        if not ptr:
            return None
        try:
            return ctypes.string_at(ptr, length.value).decode(errors="replace")
        finally:
            self._libc.free(ptr)

    def directory(self, path: str) -> list[str]:
        """Children of ``path`` ([] if it does not exist)."""
        if self.handle is None:
            return []
        num = c_uint()
        ptr = self._lib.xs_directory(self.handle, XBT_NULL, path.encode(), ctypes.byref(num))
        if not ptr:
            return []
        try:
            names = ctypes.cast(ptr, POINTER(c_char_p))
            return [(names[i] or b"").decode(errors="replace") for i in range(num.value)]
        finally:
            self._libc.free(ptr)  # one allocation holds the array and the strings

    # -- watches --------------------------------------------------------------
    def _handle(self, call: str) -> int:
        if self.handle is None:
            raise error_for(call, E.EBADF, "the xenstore handle is closed")
        return self.handle

    def watch(self, path: str, token: str) -> None:
        """Watch ``path``; events carry ``token``.  xenstored fires once at once."""
        if not self._lib.xs_watch(self._handle("xs_watch"), path.encode(), token.encode()):
            raise error_for("xs_watch", ctypes.get_errno() or E.EIO, path)

    def unwatch(self, path: str, token: str) -> None:
        if not self._lib.xs_unwatch(self._handle("xs_unwatch"), path.encode(), token.encode()):
            raise error_for("xs_unwatch", ctypes.get_errno() or E.EIO, path)

    def fileno(self) -> int:
        """A descriptor that is readable while watch events are queued."""
        fd = int(self._lib.xs_fileno(self._handle("xs_fileno")))
        if fd < 0:
            raise error_for("xs_fileno", ctypes.get_errno() or E.EIO)
        return fd

    def check_watch(self) -> tuple[str, str] | None:
        """The next queued watch event as (path, token), or None if there is none."""
        ctypes.set_errno(0)
        ptr = self._lib.xs_check_watch(self._handle("xs_check_watch"))
        if not ptr:
            err = ctypes.get_errno()
            if err in (0, E.EAGAIN):
                return None
            raise error_for("xs_check_watch", err)
        try:
            vec = ctypes.cast(ptr, POINTER(c_char_p))
            path = (vec[XS_WATCH_PATH] or b"").decode(errors="replace")
            token = (vec[XS_WATCH_TOKEN] or b"").decode(errors="replace")
            return path, token
        finally:
            self._libc.free(ptr)  # one allocation holds the vector and the strings

    def close(self) -> None:
        if self.handle is not None:
            self._lib.xs_close(self.handle)
            self.handle = None
