"""One exception tree for the whole project.

Every failure a user can meet is an ``XendbgError``; front-ends catch that one
type, print its message and carry on.  Anything else escaping is a bug.
"""

from __future__ import annotations


class XendbgError(Exception):
    """Base of every error xendbg raises on purpose."""


class BackendError(XendbgError):
    """A backend call failed.  ``call`` names the library call, ``errno`` its error."""

    def __init__(self, call: str, errno: int = 0, detail: str = "") -> None:
        self.call = call
        self.errno = errno
        self.detail = detail
        msg = f"{call} failed"
        if errno:
            import os

            msg += f": errno {errno} ({os.strerror(errno)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class DomainGone(BackendError):
    """The domain vanished (destroyed or never existed)."""


class DomainBusy(XendbgError):
    """Another debugger is already attached to this domain."""


class GuestMemoryFault(XendbgError):
    """Guest memory at ``addr`` could not be read or written."""

    def __init__(self, addr: int, reason: str = "not mapped") -> None:
        self.addr = addr
        self.reason = reason
        super().__init__(f"cannot access guest memory at {addr:#x}: {reason}")


class Unsupported(XendbgError):
    """The operation is not available on this backend / guest type."""

    def __init__(self, op: str, why: str = "") -> None:
        self.op = op
        self.why = why
        super().__init__(f"{op} is not supported" + (f": {why}" if why else ""))


class GuestImageError(XendbgError):
    """A guest image (ELF) cannot be loaded."""


class ProtocolError(XendbgError):
    """Base of GDB remote protocol errors."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed."""
