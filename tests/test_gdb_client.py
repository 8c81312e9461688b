"""Real gdb 13 (Debian) driving `xendbg serve --emu` over TCP, in batch mode."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from elfsyms import symbols
from serverproc import RspClient, Server

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb not installed")


def gdb(port: int, elf: Path, *commands: str, timeout: float = 60) -> str:
    args = [
        "gdb",
        "-nx",
        "-batch",
        "-ex",
        "set confirm off",
        "-ex",
        "set pagination off",
        "-ex",
        f"file {elf}",
        "-ex",
        f"target remote 127.0.0.1:{port}",
    ]
    for c in commands:
        args += ["-ex", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert "Remote 'g' packet reply is too long" not in text
    assert "terminated" not in text, text
    return text


def reg(text: str, name: str) -> int:
    m = re.search(rf"^{name}\s+(0x[0-9a-f]+)", text, re.M)
    assert m, f"{name} not in gdb output:\n{text}"
    return int(m.group(1), 16)


@pytest.fixture
def longmode(guests: Path) -> Path:
    return guests / "longmode.elf"


def test_attach_registers_at_first_instruction(longmode: Path) -> None:
    sym = symbols(longmode)
    with Server(longmode) as srv:
        out = gdb(srv.port, longmode, "info registers rip rdi cr0 cr3 cr4 efer fs_base cs")
    assert reg(out, "rip") == sym["_start"]
    assert reg(out, "rdi") == 0
    assert reg(out, "cr0") & 0x80000001 == 0x80000001  # PG | PE
    assert reg(out, "cr4") & 0x20  # PAE
    assert reg(out, "efer") & 0x500 == 0x500  # LME | LMA
    assert reg(out, "cr3") != 0
    assert reg(out, "fs_base") == 0


def test_breakpoint_by_symbol_higher_half_memory_and_stepi(longmode: Path) -> None:
    sym = symbols(longmode)
    with Server(longmode) as srv:
        out = gdb(
            srv.port,
            longmode,
            "break main_loop",
            "continue",
            "info registers rip cr3",
            "x/s &hh_data",
            "x/2i $pc",
            "stepi",
            "info registers rip",
            "x/1xb main_loop",
        )
    rips = [int(x, 16) for x in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
    assert rips[0] == sym["main_loop"], out
    assert rips[1] != rips[0]
    assert reg(out, "cr3") == sym["kernel_pml4"]  # the guest's own tables are live
    assert '"HIGHHALF-MARKER"' in out
    # Our int3 never shows through a memory read.
    assert "0xcc" not in out.split("x/1xb")[-1].lower().split("\n")[-2]


def test_hardware_write_watchpoint_old_and_new(longmode: Path) -> None:
    with Server(longmode) as srv:
        out = gdb(
            srv.port,
            longmode,
            "break main_loop",
            "continue",
            "delete",
            "watch *(unsigned long *)&watched",
            "continue",
            "continue",
        )
    hits = re.findall(r"Old value = (\d+)\s+New value = (\d+)", out)
    assert len(hits) == 2, out
    for old, new in hits:
        assert int(new) == int(old) + 3


def test_two_vcpus_are_two_threads(guests: Path) -> None:
    smp = guests / "smp.elf"
    with Server(smp, "--vcpus", "2") as srv:
        out = gdb(srv.port, smp, "info threads", "thread 2", "info registers rdi")
    assert re.search(r"Thread 1\b", out) and re.search(r"Thread 2\b", out), out
    assert "vCPU 1" in out
    assert reg(out, "rdi") == 1


def test_detach_leaves_guest_running_and_clean(longmode: Path) -> None:
    sym = symbols(longmode)
    with Server(longmode) as srv:
        gdb(srv.port, longmode, "break main_loop", "break tick", "continue", "detach")
        # A new client sees the original bytes (nothing shadowed: no breakpoints of its own)
        # and a guest that ran on: its counter keeps moving.
        c = RspClient(srv.port)
        c.no_ack()
        assert c.request(b"Hg1") == b"OK"
        assert c.request(b"m%x,1" % sym["main_loop"]) != b"cc"
        assert c.request(b"m%x,1" % sym["tick"]) != b"cc"
        counter = sym["counter"]
        v1 = int.from_bytes(bytes.fromhex(c.request(b"m%x,8" % counter).decode()), "little")
        c.close()  # EOF: detach, the guest runs on
        time.sleep(0.5)
        c = RspClient(srv.port)
        c.no_ack()
        v2 = int.from_bytes(bytes.fromhex(c.request(b"m%x,8" % counter).decode()), "little")
        c.close()
        assert v2 > v1


def test_spin_breakpoints_break_continue_stepi_detach(longmode: Path) -> None:
    """`--breakpoints spin`: jmp $ patches found by polling, as for a Xen PV guest."""
    sym = symbols(longmode)
    with Server(longmode, "--breakpoints", "spin") as srv:
        out = gdb(
            srv.port,
            longmode,
            "break main_loop",  # unmapped at first: a debug register stands in
            "continue",
            "delete",
            "break compute",  # `push %rbp`: a one-byte instruction under a two-byte patch
            "continue",
            "info registers rip",
            "print *(unsigned long *)&counter",
            "continue",
            "info registers rip",
            "print *(unsigned long *)&counter",
            "x/2xb compute",
            "stepi",
            "info registers rip",
            "detach",
        )
        rips = [int(x, 16) for x in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
        assert rips == [sym["compute"], sym["compute"], sym["compute"] + 1], out
        counts = [int(x) for x in re.findall(r"^\$\d+ = (\d+)", out, re.M)]
        assert len(counts) == 2 and counts[1] == counts[0] + 1, out
        # The guest's bytes, not our jmp $ (eb fe), in gdb's memory view.
        assert re.search(r"<compute>:\s+0x55\s+0x48", out), out
        # After detach: the guest's bytes are back in memory and the guest runs on.
        c = RspClient(srv.port)
        c.no_ack()
        assert c.request(b"m%x,2" % sym["compute"]) == b"5548"
        assert c.request(b"m%x,2" % sym["main_loop"]) != b"ebfe"
        counter = sym["counter"]
        v1 = int.from_bytes(bytes.fromhex(c.request(b"m%x,8" % counter).decode()), "little")
        c.close()
        time.sleep(0.3)
        c = RspClient(srv.port)
        c.no_ack()
        v2 = int.from_bytes(bytes.fromhex(c.request(b"m%x,8" % counter).decode()), "little")
        c.close()
        assert v2 > v1
