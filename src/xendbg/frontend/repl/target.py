"""Where guests come from: ``guest list`` / ``guest attach`` / ``info xen``.

The emulated target has exactly one domain, created when the REPL starts and
alive until it quits; attaching makes an engine session on it, detaching ends
that session and lets the guest run on its own.

The Xen target offers every domain of this dom0 (as ``xendbg list``); attaching
opens the domain (vm_event ring and all), detaching closes it again, so a
detached guest carries nothing of the debugger (the next debugger can attach).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from xendbg.backend.base import Domain, GuestType
from xendbg.errors import XendbgError


@dataclass(frozen=True, slots=True)
class GuestInfo:
    domid: int
    name: str
    guest_type: str
    vcpus: int
    word_size: int
    state: str


class Target(ABC):
    @abstractmethod
    def guests(self) -> list[GuestInfo]: ...

    @abstractmethod
    def domain(self, ident: str | None) -> Domain:
        """The domain ``ident`` (an id or name; None: the default one)."""

    @abstractmethod
    def attached(self, domain: Domain) -> None:
        """Called once a session holds its own pause on ``domain``."""

    @abstractmethod
    def detached(self, domain: Domain) -> None:
        """Called once the session on ``domain`` has detached."""

    @abstractmethod
    def xen_info(self) -> str: ...

    @abstractmethod
    def close(self) -> None: ...


class EmuTarget(Target):
    """One emulated domain (``--emu GUEST.elf``)."""

    def __init__(self, path: str, vcpus: int = 1, memory: int = 64 << 20) -> None:
        from xendbg.backend.emu import EmuDomain

        self.path = path
        self.memory = memory
        self.dom: Domain = EmuDomain(path, vcpus=vcpus, memory=memory, start_paused=True)
        # The emulator creates its domain paused so that a debugger sees the first
        # instruction; the first session's own pause replaces that one.
        self.creation_pause = True

    def guests(self) -> list[GuestInfo]:
        d = self.dom
        state = "paused" if d.paused else "running"
        return [GuestInfo(d.domid, d.name, str(d.guest_type), d.vcpu_count, d.word_size, state)]

    def domain(self, ident: str | None) -> Domain:
        d = self.dom
        if ident is not None and ident not in (str(d.domid), d.name):
            raise XendbgError(f"no guest {ident!r}: the emulator runs only {d.domid} ({d.name})")
        return d

    def attached(self, domain: Domain) -> None:
        if self.creation_pause:
            self.creation_pause = False
            domain.unpause()

    def detached(self, domain: Domain) -> None:
        pass  # the emulated domain lives (and runs) until the REPL quits

    def xen_info(self) -> str:
        d = self.dom
        return (
            "No Xen hypervisor: this is xendbg's emulated backend (Unicorn), not Xen.\n"
            f"It runs {self.path} as domain {d.domid} ({d.name}): {d.vcpu_count} vCPU(s), "
            f"{self.memory >> 20} MiB, {d.word_size * 8}-bit, with Xen HVM event semantics.\n"
            "Attach to a real Xen domain with the Xen backend to see the hypervisor here."
        )

    def close(self) -> None:
        self.dom.close()


class XenTarget(Target):
    """The domains of the Xen host this dom0 controls (``xendbg repl`` without ``--emu``).

    ``XenNotAvailable`` (an ``Unsupported``) when Xen's libraries or privcmd are missing.
    """

    def __init__(self) -> None:
        from xendbg.backend.xen.xenctrl import XenCtrl
        from xendbg.backend.xen.xenstore import XenStore

        self.xc = XenCtrl()
        try:
            self.xs: XenStore | None = XenStore()
        except XendbgError:
            self.xs = None  # no xenstored: ids only, no names
        self.open: dict[int, Domain] = {}

    def guests(self) -> list[GuestInfo]:
        from xendbg.backend.xen.listing import list_domains

        return [
            GuestInfo(d.domid, d.name, str(d.guest_type), d.vcpus, d.word_size or 8, d.state)
            for d in list_domains(self.xc, self.xs)
        ]

    def domain(self, ident: str | None) -> Domain:
        from xendbg.backend.xen.domain import XenDomain
        from xendbg.backend.xen.listing import resolve

        if ident is None:
            others = [g for g in self.guests() if g.domid != 0]
            if len(others) != 1:
                names = ", ".join(f"{g.domid} ({g.name})" for g in others) or "none"
                raise XendbgError(f"name the guest to attach to (guest domains: {names})")
            domid = others[0].domid
        else:
            domid = resolve(self.xc, self.xs, ident)
        if domid == 0:
            raise XendbgError("domain 0 runs the debugger itself: attach to a guest domain")
        if domid in self.open:
            return self.open[domid]
        dom = self.open[domid] = XenDomain(domid)
        return dom

    def attached(self, domain: Domain) -> None:
        pass  # a Xen domain runs until the session pauses it: no creation pause to drop

    def detached(self, domain: Domain) -> None:
        self.open.pop(domain.domid, None)
        domain.close()

    def xen_info(self) -> str:
        guests = self.guests()
        return (
            f"Xen {self.xc.version_text()}, capabilities: {self.xc.capabilities()}\n"
            f"{len(guests)} domain(s): "
            + ", ".join(f"{g.domid} ({g.name or '?'}, {g.guest_type})" for g in guests)
        )

    def close(self) -> None:
        try:
            for domid in list(self.open):
                self.open.pop(domid).close()
        finally:
            if self.xs is not None:
                self.xs.close()
            self.xc.close()


def xen_info_for(domain: Domain) -> str:
    """``info xen`` when all we have is a session (gdb's monitor)."""
    if domain.guest_type == GuestType.EMU:
        return (
            "No Xen hypervisor: this is xendbg's emulated backend (Unicorn), not Xen; "
            f"domain {domain.domid} ({domain.name}) is emulated."
        )
    return f"Xen domain {domain.domid} ({domain.name}), {domain.guest_type} guest."
