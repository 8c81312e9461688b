"""asyncio TCP adapter: sockets ↔ xendbg.rsp.Connection ↔ GdbStub ↔ engine.Session.

One debugging client per domain at a time.  While the guest runs, the blocking
``Session.wait`` sits in a worker thread and the event loop keeps reading the
socket, so a 0x03 (Ctrl-C) reaches ``Session.interrupt`` at once.  Every way a
client can leave (D, k, vKill, EOF, a broken socket, a protocol error, the
server being stopped) ends in ``Session.detach``: breakpoints and watchpoints
removed, memory restored, the domain running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable

from xendbg.backend.base import Domain
from xendbg.engine.session import Session
from xendbg.engine.stops import Stop
from xendbg.errors import RemoteProtocolError, XendbgError
from xendbg.frontend.gdbserver.stub import Detach, GdbStub, MonitorFn, Resume
from xendbg.rsp import Connection, ConnectionClosed, Interrupt, NeedData, Packet, replies

log = logging.getLogger("xendbg.gdbserver")

READ_SIZE = 1 << 16
DETACH_GRACE = 2.0  # seconds a new client waits for the previous one to finish detaching


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DomainServer:
    """Serves one domain on one port."""

    def __init__(
        self,
        domain: Domain,
        *,
        host: str = "127.0.0.1",
        port: int = 1234,
        monitor_factory: Callable[[Session], MonitorFn] | None = None,
        release_initial_pause: bool = False,
    ) -> None:
        self.domain = domain
        self.host = host
        self.port = port
        self.monitor_factory = monitor_factory
        # The emulated domain is created paused so that the first client sees its
        # first instruction; that creation pause is dropped once a session holds its own.
        self._initial_pause = release_initial_pause
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if self._busy:
                # The previous client may be mid-detach (it just hung up): give it a moment.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), DETACH_GRACE)
            if self._busy:
                await self._refuse(reader, writer)
                return
            self._busy = True
            self._idle.clear()
            try:
                await ClientSession(self, reader, writer).run()
            finally:
                self._busy = False
                self._idle.set()
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A second debugger: answer its first packet with an error and hang up."""
        msg = f"another debugger is attached to domain {self.domain.domid}"
        log.warning("refused a second client: %s", msg)
        conn = Connection()
        try:
            while True:
                data = await asyncio.wait_for(reader.read(READ_SIZE), 10)
                conn.receive_data(data)
                ev = conn.next_event()
                if isinstance(ev, NeedData):
                    continue
                if isinstance(ev, Packet):
                    writer.write(conn.send_packet(b"E." + msg.encode()))
                    await writer.drain()
                break
        except (TimeoutError, RemoteProtocolError, ConnectionError):
            pass

    def attach(self) -> Session:
        session = Session(self.domain)
        if self._initial_pause:
            self._initial_pause = False
            self.domain.unpause()
        return session


class ClientSession:
    def __init__(
        self, server: DomainServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = Connection()
        self.waiter: asyncio.Future[Stop | None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(None, self.server.attach)
        monitor = None
        if self.server.monitor_factory is not None:
            monitor = self.server.monitor_factory(session)
        stub = GdbStub(session, monitor)
        peer = self.writer.get_extra_info("peername")
        log.info("client %s attached to domain %s", peer, self.server.domain.domid)
        try:
            await self._loop(session, stub)
        except (RemoteProtocolError, ConnectionError) as e:
            log.warning("client %s: %s", peer, e)
        finally:
            await self._detach(session)
            log.info("client %s detached", peer)

    async def _detach(self, session: Session) -> None:
        loop = asyncio.get_running_loop()
        if self.waiter is not None and not self.waiter.done():
            session.interrupt()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.waiter), 5)
        try:
            await loop.run_in_executor(None, session.detach)
        except XendbgError as e:
            log.error("detach failed: %s", e)

    def _send(self, payload: bytes) -> None:
        self.writer.write(self.conn.send_packet(payload))

    async def _loop(self, session: Session, stub: GdbStub) -> None:
        queued: list[Packet] = []
        read_task: asyncio.Task[bytes] | None = None
        while True:
            # Drain complete events from what has arrived.
            while True:
                ev = self.conn.next_event()
                if extra := self.conn.data_to_send():
                    self.writer.write(extra)
                if isinstance(ev, NeedData):
                    break
                if isinstance(ev, ConnectionClosed):
                    return
                if isinstance(ev, Interrupt):
                    if self.waiter is not None:
                        session.interrupt()
                    continue
                if isinstance(ev, Packet):
                    if self.waiter is not None:
                        queued.append(ev)  # all-stop: answered once the guest stops
                        continue
                    if await self._dispatch(session, stub, ev) is False:
                        return
            await self.writer.drain()

            if read_task is None:
                read_task = asyncio.ensure_future(self.reader.read(READ_SIZE))
            wait_set: set[asyncio.Future[object]] = {read_task}  # type: ignore[arg-type]
            if self.waiter is not None:
                wait_set.add(self.waiter)  # type: ignore[arg-type]
            done, _ = await asyncio.wait(wait_set, return_when=asyncio.FIRST_COMPLETED)
            if self.waiter is not None and self.waiter in done:
                stop = self.waiter.result()
                self.waiter = None
                if stop is not None:
                    self._send(stub.stop_reply(stop))
                for pkt in queued:
                    if await self._dispatch(session, stub, pkt) is False:
                        return
                queued.clear()
            if read_task in done:
                data = read_task.result()
                read_task = None
                self.conn.receive_data(data)

    async def _dispatch(self, session: Session, stub: GdbStub, ev: Packet) -> bool:
        loop = asyncio.get_running_loop()
        action = await loop.run_in_executor(None, stub.handle, ev.request)
        if isinstance(action, bytes):
            self._send(action)
            return True
        if isinstance(action, Detach):
            if action.reply is not None:
                self._send(action.reply)
                await self.writer.drain()
            return False
        assert isinstance(action, Resume)
        try:
            await loop.run_in_executor(None, session.resume, action.step)
        except XendbgError as e:
            self._send(replies.error(0x05, str(e) if stub.error_strings else None))
            return True
        self.waiter = loop.run_in_executor(None, session.wait, None)
        return True


async def serve_domain(
    domain: Domain,
    *,
    host: str,
    port: int,
    monitor_factory: Callable[[Session], MonitorFn] | None = None,
    release_initial_pause: bool = False,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; then detach any client and return."""
    server = DomainServer(
        domain,
        host=host,
        port=port,
        monitor_factory=monitor_factory,
        release_initial_pause=release_initial_pause,
    )
    await server.start()
    if ready is not None:
        ready(server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def warn_if_exposed(host: str) -> None:
    if not is_loopback(host):
        print(
            f"xendbg: WARNING: listening on {host}: anyone who can reach this port can read "
            "and rewrite guest memory",
            file=sys.stderr,
        )
