"""Server mode for Xen: one GDB port per guest domain, following domains as they come and go.

``xendbg serve`` without ``--attach`` serves every guest domain (never dom0), each on its
own port counting up from the base port; ``--attach DOMAIN`` serves that one domain and
stops when it is destroyed.  Both run the same loop:

* a **watch source** (``XenStoreWatch``: XenStore watches on ``@introduceDomain`` and
  ``@releaseDomain``) makes a descriptor readable whenever a domain appears or goes; the
  events do not say which, so
* a **lister** (``xen_guests``) rescans the domains, and
* ``Follower.refresh`` diffs that list against the open ports: a new domain gets the lowest
  port >= the base that no open server holds and that binds (a restarted guest gets its
  port back), a vanished one has its server told (``DomainServer.vanish``: an attached
  client gets X09 or an error reply) and its port closed.

Each port is a ``XenDomainServer``: the domain is attached (vm_event ring, pause) only
while a client is connected, so an idle port leaves its guest untouched and a detached
client leaves no monitor ring behind for the next debugger.
"""

from __future__ import annotations

import contextlib
import errno as E
import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from xendbg.backend.base import Domain
from xendbg.errors import XendbgError
from xendbg.frontend.gdbserver.server import DomainServer, MonitorFactory

log = logging.getLogger("xendbg.gdbserver")

WATCH_TOKEN = "xendbg-serve"
MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class DomainRef:
    domid: int
    name: str

    def __str__(self) -> str:
        return f"domain {self.domid} ({self.name or '?'})"


class WatchSource(Protocol):
    """A stream of XenStore watch events: a descriptor readable while some are queued."""

    def fileno(self) -> int: ...

    def events(self) -> list[tuple[str, str]]:
        """Take every queued (path, token) without blocking."""
        ...

    def close(self) -> None: ...


class PortServer(Protocol):
    """What the follower needs of a server on one port (``DomainServer`` is one)."""

    port: int

    def start(self) -> None: ...

    def vanish(self, why: str) -> None: ...

    def close(self) -> None: ...


Lister = Callable[[], list[DomainRef]]
ServerFactory = Callable[[DomainRef, int], PortServer]
Announce = Callable[[str], None]


class Follower:
    """Keeps exactly one open port per live domain of ``lister``.

    ``only``: follow that domain id alone; ``finished`` turns true once it has been
    served and is gone (or was never there).  Not thread-safe: one caller drives it.
    """

    def __init__(
        self,
        lister: Lister,
        factory: ServerFactory,
        *,
        base_port: int,
        announce: Announce,
        only: int | None = None,
    ) -> None:
        self.lister = lister
        self.factory = factory
        self.base_port = base_port
        self.announce = announce
        self.only = only
        self.servers: dict[int, tuple[DomainRef, PortServer]] = {}
        self._retiring: list[threading.Thread] = []
        self.finished = False

    def ports(self) -> dict[int, int]:
        """domid -> port of every open server."""
        return {domid: srv.port for domid, (_, srv) in self.servers.items()}

    def refresh(self) -> None:
        live = {d.domid: d for d in self.lister() if self.only in (None, d.domid)}
        self._retiring = [t for t in self._retiring if t.is_alive()]
        for domid in sorted(set(self.servers) - set(live)):
            ref, srv = self.servers.pop(domid)
            srv.vanish(f"{ref} was destroyed")
            self.announce(f"{ref} gone: port {srv.port} closed")
            # Its client may still be saying goodbye: join it aside, not in this loop.
            retire = threading.Thread(target=srv.close, name=f"xendbg-retire-{srv.port}")
            retire.start()
            self._retiring.append(retire)
        for domid in sorted(set(live) - set(self.servers)):
            self._open(live[domid])
        if self.only is not None:
            self.finished = self.only not in live

    def _open(self, ref: DomainRef) -> None:
        taken = {srv.port for _, srv in self.servers.values()}
        port = self.base_port
        while port <= MAX_PORT:
            if port == 0 or port not in taken:
                try:
                    srv = self.factory(ref, port)
                    srv.start()
                except XendbgError as exc:  # e.g. gone again before we could look at it
                    self.announce(f"{ref}: not served: {exc}")
                    return
                except OSError as exc:
                    if exc.errno != E.EADDRINUSE or port == 0:
                        self.announce(f"{ref}: cannot listen on port {port}: {exc.strerror}")
                        return
                else:
                    self.servers[ref.domid] = (ref, srv)
                    self.announce(f"{ref} on port {srv.port}")
                    return
            port += 1
        self.announce(f"{ref}: no free port from {self.base_port} up")

    def close(self) -> None:
        """Close every port (clients detach first) and wait for vanished ones to finish."""
        for domid in sorted(self.servers):
            _, srv = self.servers.pop(domid)
            srv.close()
        for retire in self._retiring:
            retire.join()
        self._retiring.clear()


def follow(watch: WatchSource, follower: Follower, stop_fd: int) -> None:
    """Refresh ``follower`` at start and on every watch event, until ``stop_fd`` is
    readable or the followed domain is gone.  Closes every port before returning."""
    try:
        follower.refresh()
        while not follower.finished:
            ready, _, _ = select.select([watch.fileno(), stop_fd], [], [])
            if stop_fd in ready:
                return
            if watch.events():
                follower.refresh()
    finally:
        follower.close()


# -- real Xen ---------------------------------------------------------------------------


class XenStoreWatch:
    """Watches ``@introduceDomain`` and ``@releaseDomain`` on a XenStore handle of its own."""

    def __init__(self) -> None:
        from xendbg.backend.xen.xenstore import INTRODUCE_DOMAIN, RELEASE_DOMAIN, XenStore

        self.xs = XenStore()
        self.paths = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)
        try:
            for path in self.paths:
                self.xs.watch(path, WATCH_TOKEN)
        except BaseException:
            self.xs.close()
            raise

    def fileno(self) -> int:
        return self.xs.fileno()

    def events(self) -> list[tuple[str, str]]:
        out = []
        while (ev := self.xs.check_watch()) is not None:
            out.append(ev)
        return out

    def close(self) -> None:
        for path in self.paths:
            with contextlib.suppress(XendbgError):
                self.xs.unwatch(path, WATCH_TOKEN)
        self.xs.close()


def xen_guests() -> list[DomainRef]:
    """Every guest domain (not dom0) that is not dying, with its xenstore name."""
    from xendbg.backend.xen import listing, structs
    from xendbg.backend.xen.xenctrl import XenCtrl
    from xendbg.backend.xen.xenstore import XenStore

    with XenCtrl() as xc:
        try:
            xs: XenStore | None = XenStore()
        except XendbgError:
            xs = None
        try:
            version = xc.version()
            out = []
            first = 1  # dom0 is the debugger's own domain
            while (info := xc.domain_info_from(first, version)) is not None:
                domid = int(info.domain)
                first = domid + 1
                if not int(info.flags) & structs.XEN_DOMINF_dying:
                    out.append(DomainRef(domid, listing.domain_name(xs, domid)))
            return out
        finally:
            if xs is not None:
                xs.close()


class XenDomainServer(DomainServer):
    """One Xen domain on one port.  The port holds a handle without events (for the
    domain's id and name; the guest is untouched); each client gets a full attach
    (``opener``), closed again when it detaches."""

    def __init__(
        self,
        handle: Domain,
        opener: Callable[[int], Domain],
        *,
        host: str,
        port: int,
        monitor_factory: MonitorFactory | None = None,
        breakpoints: str = "auto",
    ) -> None:
        super().__init__(
            handle,
            host=host,
            port=port,
            monitor_factory=monitor_factory,
            breakpoints=breakpoints,
        )
        self.opener = opener

    def open_domain(self) -> Domain:
        return self.opener(self.domain.domid)

    def start(self) -> None:
        try:
            super().start()
        except OSError:
            self.domain.close()  # the follower drops a server that cannot listen
            raise

    def close_domain(self, domain: Domain) -> None:
        try:
            domain.close()
        except XendbgError as exc:
            if self.gone is None:
                log.error("closing domain %s: %s", domain.domid, exc)

    def close(self) -> None:
        try:
            super().close()
        finally:
            with contextlib.suppress(XendbgError):
                self.domain.close()


def xen_server_factory(
    host: str, monitor_factory: MonitorFactory | None = None, breakpoints: str = "auto"
) -> ServerFactory:
    """Servers on real Xen domains: an event-less handle per port, a full attach per client."""
    from xendbg.backend.xen.domain import XenDomain

    def factory(ref: DomainRef, port: int) -> PortServer:
        handle = XenDomain(ref.domid, events=False)
        return XenDomainServer(
            handle,
            XenDomain,
            host=host,
            port=port,
            monitor_factory=monitor_factory,
            breakpoints=breakpoints,
        )

    return factory


def serve_xen(
    *,
    host: str,
    base_port: int,
    only: str | None = None,
    monitor_factory: MonitorFactory | None = None,
    breakpoints: str = "auto",
    announce: Announce = print,
    watch: WatchSource | None = None,
) -> int:
    """``xendbg serve`` on Xen until SIGINT/SIGTERM (or, with ``only``, until that
    domain is destroyed).  Returns the exit status."""
    import signal

    from xendbg.backend.xen.xenctrl import XenCtrl

    XenCtrl().close()  # no privcmd, no Xen: say so before anything else
    only_id = None if only is None else resolve_guest(only)
    watch = watch or XenStoreWatch()
    follower = Follower(
        xen_guests,
        xen_server_factory(host, monitor_factory, breakpoints),
        base_port=base_port,
        announce=announce,
        only=only_id,
    )
    if only_id is None:
        port = "any free ports" if base_port == 0 else f"ports from {base_port} up"
        announce(f"following Xen guest domains: one GDB port each, {port}")
    stop_r, stop_w = os.pipe()
    previous = {
        sig: signal.signal(sig, lambda *_: os.write(stop_w, b"x"))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        follow(watch, follower, stop_r)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        watch.close()
        os.close(stop_r)
        os.close(stop_w)
    return 0


def resolve_guest(target: str) -> int:
    """The id of the guest domain ``target`` (an id or a name); dom0 is refused."""
    from xendbg.backend.xen import listing
    from xendbg.backend.xen.xenctrl import XenCtrl
    from xendbg.backend.xen.xenstore import XenStore

    with XenCtrl() as xc:
        try:
            xs: XenStore | None = XenStore()
        except XendbgError:
            xs = None
        try:
            domid = listing.resolve(xc, xs, target)
        finally:
            if xs is not None:
                xs.close()
    if domid == 0:
        raise XendbgError("domain 0 runs the debugger itself: attach to a guest domain")
    return domid
