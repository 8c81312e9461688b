"""Protocol-level tests of the running server: Ctrl-C, hostile input, a second client,
a client that vanishes while the guest runs."""

from __future__ import annotations

import random
import re
import socket
import time
from pathlib import Path

import pytest

from elfsyms import symbols
from serverproc import RspClient, Server


@pytest.fixture
def longmode(guests: Path) -> Path:
    return guests / "longmode.elf"


def code_image(c: RspClient, start: int, size: int) -> bytes:
    out = b""
    for off in range(0, size, 0x400):
        out += bytes.fromhex(c.request(b"m%x,%x" % (start + off, 0x400)).decode())
    return out


def test_interrupt_while_running(longmode: Path) -> None:
    with Server(longmode) as srv:
        c = RspClient(srv.port)
        c.no_ack()
        assert c.request(b"?").startswith(b"T05")
        c.send_raw(b"$vCont;c#a8")
        time.sleep(0.3)
        c.send_raw(b"\x03")
        reply = c.read_packet()
        assert reply.startswith(b"T02"), reply
        # Stopped for real: two register reads agree.
        assert c.request(b"p10") == c.request(b"p10")
        c.close()


def test_hostile_input_keeps_server_and_guest_intact(longmode: Path) -> None:
    sym = symbols(longmode)
    start = sym["_start"] & ~0xFFF
    with Server(longmode) as srv:
        c = RspClient(srv.port)
        before = code_image(c, start, 0x1000)
        bad = [
            b"m",
            b"mzz,10",
            b"m1000",
            b"M1000,4:zz",
            b"X1000,4",
            b"Z0,zz,1",
            b"Z9,1000,1",
            b"z0,1000",
            b"p",
            b"pzz",
            b"P10=",
            b"Pzz=00",
            b"G0",
            b"Hgzz",
            b"Hg99",
            b"T99",
            b"vCont;q",
            b"vCont;s:zz",
            b"qXfer:features:read:target.xml:zz,10",
            b"qXfer:features:read:nope.xml:0,10",
            b"qRcmd,zz",
            b"m0,ffffffff",
            b"mffffffffffffffff,10",
            b"Mfffffffffffff000,1:00",
            b"\xff\xfe",
        ]
        assert c.request(b"qSupported:" + b"x" * 3000).startswith(b"PacketSize=")
        for payload in bad:
            reply = c.request(payload)
            well_formed = reply == b"" or reply.startswith((b"E", b"OK", b"l", b"QC"))
            if payload.startswith(b"m"):  # a partial read is a legal answer
                well_formed |= re.fullmatch(rb"([0-9a-f]{2})+", reply) is not None
            assert well_formed, (payload, reply[:80])
        # Broken framing and random garbage, with and without packets inside.
        rng = random.Random(1234)
        for _ in range(20):
            c.send_raw(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        c.close()
        assert srv.alive()
        c = RspClient(srv.port)
        c.no_ack()
        assert code_image(c, start, 0x1000) == before
        assert c.request(b"qC").startswith(b"QC")
        c.close()


def test_second_client_is_refused_first_undisturbed(longmode: Path) -> None:
    with Server(longmode) as srv:
        first = RspClient(srv.port)
        first.no_ack()
        pc = first.request(b"p10")
        second = RspClient(srv.port)
        reply = second.request(b"qSupported")
        assert reply.startswith(b"E") and b"another debugger" in reply
        second.close()
        assert first.request(b"p10") == pc
        first.close()


def test_killed_client_while_running_detaches(longmode: Path) -> None:
    sym = symbols(longmode)
    tick = sym["tick"]
    with Server(longmode) as srv:
        c = RspClient(srv.port)
        c.no_ack()
        assert c.request(b"Z0,%x,1" % tick) == b"OK"
        reply = c.request(b"vCont;c")
        assert reply.startswith(b"T05")
        assert c.request(b"Z0,%x,1" % sym["compute"]) == b"OK"
        c.send_raw(b"$vCont;c#a8")
        c.sock.shutdown(socket.SHUT_RDWR)  # vanish while the guest runs
        c.close()
        time.sleep(0.5)
        c = RspClient(srv.port)
        c.no_ack()
        # No int3 left behind, and the guest is not stuck on one.
        assert c.request(b"m%x,1" % tick) != b"cc"
        assert c.request(b"m%x,1" % sym["compute"]) != b"cc"
        counter = sym["counter"]
        v1 = c.request(b"m%x,8" % counter)
        c.close()
        time.sleep(0.3)
        c = RspClient(srv.port)
        v2 = c.request(b"m%x,8" % counter)
        c.close()
        assert v1 != v2


def test_sigterm_detaches_cleanly(longmode: Path) -> None:
    srv = Server(longmode)
    c = RspClient(srv.port)
    c.no_ack()
    assert c.request(b"Z0,%x,1" % symbols(longmode)["tick"]) == b"OK"
    assert srv.stop() == 0
    c.close()
