"""TCP adapter: sockets ↔ xendbg.rsp.Connection ↔ GdbStub ↔ engine.Session.

One thread per connected client, with plain blocking sockets and ``select``:
a round trip costs a fraction of what an asyncio stream does, and a debugging
session is one client at a time anyway.  While the guest runs, the client's
thread selects on the socket *and* on the engine's descriptors
(``Session.wait_fds``), so a 0x03 (Ctrl-C) reaches ``Session.interrupt`` at once
and a stop is reported as soon as it happens; when the session polls for its
stops (spin breakpoints: no event says a vCPU reached a ``jmp $``), the select
times out after ``Session.poll_interval`` and the thread asks again.

Every way a client can leave (D, k, vKill, EOF, a broken socket, a protocol
error, the server being stopped) ends in ``Session.detach``: breakpoints and
watchpoints removed, memory restored, the domain running.  One debugging client
per domain at a time: a second one gets an error reply and is disconnected.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import sys
import threading
from collections.abc import Callable

from xendbg.backend.base import Domain
from xendbg.engine.session import Session
from xendbg.errors import RemoteProtocolError, XendbgError
from xendbg.frontend.gdbserver.stub import Detach, GdbStub, MonitorFn, Resume
from xendbg.rsp import Connection, ConnectionClosed, Interrupt, NeedData, Packet, replies

log = logging.getLogger("xendbg.gdbserver")

READ_SIZE = 1 << 16
DETACH_GRACE = 2.0  # seconds a new client waits for the previous one to finish detaching
REFUSE_TIMEOUT = 10.0

MonitorFactory = Callable[[Session], MonitorFn]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str) -> None:
    if not is_loopback(host):
        print(
            f"xendbg: WARNING: listening on {host}: anyone who can reach this port can read "
            "and rewrite guest memory",
            file=sys.stderr,
        )


class DomainServer:
    """Serves one domain on one TCP port, from a background accept thread."""

    def __init__(
        self,
        domain: Domain,
        *,
        host: str = "127.0.0.1",
        port: int = 1234,
        monitor_factory: MonitorFactory | None = None,
        release_initial_pause: bool = False,
        breakpoints: str = "auto",
    ) -> None:
        self.domain = domain
        self.breakpoints = breakpoints  # Session's breakpoint strategy: auto, int3, spin
        self.host = host
        self.port = port
        self.monitor_factory = monitor_factory
        # The emulated domain is created paused so that the first client sees its
        # first instruction; that creation pause is dropped once a session holds its own.
        self._initial_pause = release_initial_pause
        self._slot = threading.Lock()  # held by the attached client
        self._clients: set[ClientSession] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.gone: str | None = None  # why the domain vanished (see vanish)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(4)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"xendbg-accept-{self.port}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop listening, detach every client (waiting for it), join the threads."""
        clients = self._stop_listening()
        for c in clients:
            c.join()
        if self._thread is not None:
            self._thread.join(5)

    def vanish(self, why: str) -> None:
        """The domain is gone (destroyed): stop listening and tell the attached client,
        which gets the stop reply X09 if the guest was running, else an error reply to
        its next packet.  Returns at once; ``close`` joins the client threads."""
        self.gone = why
        self._stop_listening()

    def _stop_listening(self) -> list[ClientSession]:
        """Close the port and ask every client to finish; returns them for joining."""
        with self._lock:
            self._closing = True
            clients = list(self._clients)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for c in clients:
            c.stop()
        return clients

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                client = ClientSession(self, conn, peer)
                self._clients.add(client)
            client.start()

    def _forget(self, client: ClientSession) -> None:
        with self._lock:
            self._clients.discard(client)

    def open_domain(self) -> Domain:
        """The domain a new client's session runs on (a hook: servers that attach to
        the domain only while a client is connected open it here)."""
        return self.domain

    def close_domain(self, domain: Domain) -> None:
        """Called once a client's session has detached from ``open_domain``'s domain."""

    def attach(self) -> Session:
        domain = self.open_domain()
        try:
            session = Session(domain, breakpoints=self.breakpoints)
        except BaseException:
            self.close_domain(domain)
            raise
        if self._initial_pause:
            self._initial_pause = False
            self.domain.unpause()
        return session


class ClientSession:
    """One TCP client: its own thread, its own Connection, one Session while attached."""

    def __init__(self, server: DomainServer, sock: socket.socket, peer: object) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.conn = Connection()
        self._out = bytearray()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"xendbg-client-{peer}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the client thread to detach and finish (thread-safe)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def join(self) -> None:
        self._thread.join(30)

    def _send(self, payload: bytes) -> None:
        self._out += self.conn.send_packet(payload)

    def _flush(self) -> None:
        """One write per batch of replies: every extra segment costs a wake-up."""
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            self.sock.sendall(data)

    def _run(self) -> None:
        try:
            if not self.server._slot.acquire(timeout=DETACH_GRACE):
                self._refuse()
                return
            try:
                self._serve()
            finally:
                self.server._slot.release()
        except Exception:  # a bug: log it, never let it take the server down
            log.exception("client %s: internal error", self.peer)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.server._forget(self)

    def _refuse(self) -> None:
        """A second debugger: answer its first packet with an error and hang up."""
        msg = f"another debugger is attached to domain {self.server.domain.domid}"
        log.warning("refused %s: %s", self.peer, msg)
        self.sock.settimeout(REFUSE_TIMEOUT)
        try:
            while True:
                data = self.sock.recv(READ_SIZE)
                self.conn.receive_data(data)
                ev = self.conn.next_event()
                if isinstance(ev, NeedData):
                    continue
                if isinstance(ev, Packet):
                    self._send(b"E." + msg.encode())
                    self._flush()
                return
        except (OSError, RemoteProtocolError):
            return

    def _serve(self) -> None:
        try:
            session = self.server.attach()
        except XendbgError as e:
            log.error("attach failed: %s", e)
            with contextlib.suppress(OSError):
                self._refuse_with(str(e))
            return
        monitor = None
        if self.server.monitor_factory is not None:
            monitor = self.server.monitor_factory(session)
        stub = GdbStub(session, monitor)
        log.info("client %s attached to domain %s", self.peer, self.server.domain.domid)
        try:
            self._loop(session, stub)
            self._flush()  # e.g. the OK of a D
        except (RemoteProtocolError, OSError) as e:
            log.warning("client %s: %s", self.peer, e)
        finally:
            self._detach(session)
            log.info("client %s detached", self.peer)

    def _refuse_with(self, message: str) -> None:
        self.sock.settimeout(REFUSE_TIMEOUT)
        data = self.sock.recv(READ_SIZE)
        self.conn.receive_data(data)
        if isinstance(self.conn.next_event(), Packet):
            self._send(b"E." + message.encode())
            self._flush()

    def _report_gone(self, running: bool, why: str) -> None:
        """The domain vanished: a running guest's stop reply is X09 (killed); an idle
        client's next packet gets an error reply saying why."""
        if running:
            self._send(replies.terminated(9))
            self._flush()
            return
        self.sock.settimeout(REFUSE_TIMEOUT)
        while True:
            ev = self.conn.next_event()
            self._out += self.conn.data_to_send()
            if isinstance(ev, Packet):
                self._send(b"E." + why.encode())
                self._flush()
                return
            if isinstance(ev, ConnectionClosed):
                return
            if isinstance(ev, NeedData):
                self._flush()
                data = self.sock.recv(READ_SIZE)
                if not data:
                    return
                self.conn.receive_data(data)

    def _detach(self, session: Session) -> None:
        try:
            session.detach()
        except XendbgError as e:
            if self.server.gone is None:
                log.error("detach failed: %s", e)
        finally:
            self.server.close_domain(session.domain)

    def _loop(self, session: Session, stub: GdbStub) -> None:
        running = False
        queued: list[Packet] = []
        while True:
            while True:  # handle every complete event that has arrived
                ev = self.conn.next_event()
                self._out += self.conn.data_to_send()
                if isinstance(ev, NeedData):
                    break
                if isinstance(ev, ConnectionClosed):
                    return
                if isinstance(ev, Interrupt):
                    if running:
                        session.interrupt()
                    continue
                if isinstance(ev, Packet):
                    if running:
                        queued.append(ev)  # all-stop: answered once the guest stops
                        continue
                    action = self._dispatch(session, stub, ev)
                    if action is None:
                        return
                    running = action
            if running:
                # The stop may already be there (a step, a stop pending from before).
                running = not self._report_stop(session, stub)
                if not running:
                    for pkt in queued:
                        action = self._dispatch(session, stub, pkt)
                        if action is None:
                            return
                        running = action
                        if running:
                            break
                    queued.clear()
                    continue
            self._flush()
            fds: list[int] = [self.sock.fileno(), self._wake_r]
            timeout = None
            if running:
                fds += session.wait_fds()
                timeout = session.poll_interval
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._wake_r in ready or self._stopping:
                if self.server.gone is not None:
                    self._report_gone(running, self.server.gone)
                return
            if self.sock.fileno() in ready:
                self.conn.receive_data(self.sock.recv(READ_SIZE))

    def _report_stop(self, session: Session, stub: GdbStub) -> bool:
        """Send the stop reply if the guest has stopped; True if it has."""
        try:
            stop = session.wait(0)
        except XendbgError as e:
            log.error("the guest did not stop cleanly: %s", e)
            self._send(replies.error(0x05))
            return True
        if stop is None:
            return False
        self._send(stub.stop_reply(stop))
        return True

    def _dispatch(self, session: Session, stub: GdbStub, ev: Packet) -> bool | None:
        """Answer one packet.  True: the guest now runs; None: the client is done."""
        action = stub.handle(ev.request)
        if isinstance(action, bytes):
            self._send(action)
            return False
        if isinstance(action, Detach):
            if action.reply is not None:
                self._send(action.reply)
            return None
        assert isinstance(action, Resume)
        try:
            session.resume(action.step)
        except XendbgError as e:
            self._send(replies.error(0x05, str(e) if stub.error_strings else None))
            return False
        return True


def serve_domain(
    domain: Domain,
    *,
    host: str,
    port: int,
    monitor_factory: MonitorFactory | None = None,
    release_initial_pause: bool = False,
    ready: Callable[[int], None] | None = None,
    breakpoints: str = "auto",
) -> None:
    """Serve until SIGINT/SIGTERM; then detach any client and return."""
    import signal

    server = DomainServer(
        domain,
        host=host,
        port=port,
        monitor_factory=monitor_factory,
        release_initial_pause=release_initial_pause,
        breakpoints=breakpoints,
    )
    done = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.start()
        if ready is not None:
            ready(server.port)
        while not done.wait(0.5):
            pass
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
