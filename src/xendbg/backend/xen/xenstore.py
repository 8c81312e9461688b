"""ctypes bindings of libxenstore: reading domain metadata such as names.

``xs_read`` and ``xs_directory`` return malloc'd memory the caller frees
(seed 000, "Extras — XenStore").
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char_p, c_uint, c_ulong, c_void_p

from xendbg.backend.xen._lib import XENSTORE_SONAMES, XenNotAvailable, declare, load

XBT_NULL = 0  # no transaction


class XenStore:
    """An open ``xs_handle`` (read-only use)."""

    def __init__(self) -> None:
        lib = self._lib = load(XENSTORE_SONAMES, "libxenstore")
        p = c_void_p
        declare(lib, "xs_open", p, c_ulong)
        declare(lib, "xs_close", None, p)
        declare(lib, "xs_read", p, p, c_uint, c_char_p, POINTER(c_uint))
        declare(lib, "xs_directory", p, p, c_uint, c_char_p, POINTER(c_uint))
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

    def close(self) -> None:
        if self.handle is not None:
            self._lib.xs_close(self.handle)
            self.handle = None
