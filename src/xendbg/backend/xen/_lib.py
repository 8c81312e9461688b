"""Loading Xen's libraries by soname and turning their failures into errors.

Every Xen library call returns an int (0 or a value on success; -1 with errno
set, or a negative errno, on failure) or a pointer (NULL with errno set), as
seed 000 ("Assumptions: Error checking") sums it up.  ``check`` and
``check_ptr`` turn those into typed errors carrying the call's name and errno.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
from collections.abc import Sequence

from xendbg.errors import BackendError, DomainGone, Unsupported

HINT = "are you in dom0 with the Xen tools installed?"

# libxenctrl's soname carries the Xen release: try the releases this project
# knows (4.11 … 4.20), newest first, then the development symlink.
XENCTRL_SONAMES = (*tuple(f"libxenctrl.so.4.{m}" for m in range(20, 10, -1)), "libxenctrl.so")
XENFOREIGNMEMORY_SONAMES = ("libxenforeignmemory.so.1", "libxenforeignmemory.so")
XENEVTCHN_SONAMES = ("libxenevtchn.so.1", "libxenevtchn.so")
XENSTORE_SONAMES = ("libxenstore.so.4", "libxenstore.so.3.0", "libxenstore.so")
XENDEVICEMODEL_SONAMES = ("libxendevicemodel.so.1", "libxendevicemodel.so")
XENTOOLLOG_SONAMES = ("libxentoollog.so.1", "libxentoollog.so")


class XenNotAvailable(Unsupported):
    """Xen's libraries or the hypervisor interface are missing on this machine."""

    def __init__(self, detail: str) -> None:
        super().__init__("xen", detail)
        Exception.__init__(self, f"Xen is not available here: {detail} ({HINT})")


def load(sonames: Sequence[str], what: str) -> ctypes.CDLL:
    """The first of ``sonames`` that loads, with errno capture on."""
    errors = []
    for name in sonames:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            errors.append(str(exc))
    raise XenNotAvailable(f"cannot load {what} (tried {', '.join(sonames)})")


def soname_version(lib: ctypes.CDLL) -> tuple[int, int] | None:
    """(major, minor) from a libxenctrl soname such as libxenctrl.so.4.17."""
    parts = os.path.basename(lib._name).split(".so.")
    if len(parts) != 2:
        return None
    nums = parts[1].split(".")
    if len(nums) < 2 or not (nums[0].isdigit() and nums[1].isdigit()):
        return None
    return int(nums[0]), int(nums[1])


def error_for(call: str, err: int, detail: str = "") -> BackendError:
    """The typed error for ``call`` failing with ``err``."""
    if err == E.ESRCH:
        return DomainGone(call, err, detail or "no such domain")
    return BackendError(call, err, detail)


def failure_errno(rc: int) -> int:
    """errno of a failed call: -1 means "look at errno", other negatives are -errno."""
    if rc == -1:
        return ctypes.get_errno() or E.EIO
    return -rc


def check(call: str, rc: int, detail: str = "") -> int:
    """``rc`` if the call succeeded (>= 0), else raise its typed error."""
    if rc < 0:
        raise error_for(call, failure_errno(rc), detail)
    return rc


def check_ptr(call: str, ptr: int | None, detail: str = "") -> int:
    """A non-NULL pointer, else raise with errno."""
    if not ptr:
        raise error_for(call, ctypes.get_errno() or E.EIO, detail)
    return ptr


def declare(lib: ctypes.CDLL, name: str, restype: type | None, *argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """Set a function's prototype so ctypes converts 64-bit values and pointers right."""
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


class XtlLogger:
    """A libxentoollog stderr logger that drops messages below ``XTL_ERROR``.

    With a NULL logger, libxenctrl and friends print progress chatter; we
    raise typed errors ourselves, so only the libraries' own errors are kept.
    """

    # enum xentoollog_level: NONE DEBUG VERBOSE DETAIL PROGRESS INFO NOTICE WARN ERROR CRITICAL
    XTL_ERROR = 8
    XTL_NUM_LEVELS = 10

    def __init__(self, quiet: bool = False) -> None:
        self.ptr: int | None = None
        try:
            self._lib = load(XENTOOLLOG_SONAMES, "libxentoollog")
            libc = ctypes.CDLL(None)
        except (XenNotAvailable, OSError):
            return
        stderr = ctypes.c_void_p.in_dll(libc, "stderr")
        create = declare(
            self._lib,
            "xtl_createlogger_stdiostream",
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_uint,
        )
        level = self.XTL_NUM_LEVELS if quiet else self.XTL_ERROR
        self.ptr = create(stderr, level, 0) or None

    def close(self) -> None:
        if self.ptr:
            declare(self._lib, "xtl_logger_destroy", None, ctypes.c_void_p)(self.ptr)
            self.ptr = None
