"""Real lldb 14 (Debian) driving `xendbg serve --emu` over TCP, in batch mode."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from elfsyms import symbols
from serverproc import RspClient, Server

pytestmark = pytest.mark.skipif(shutil.which("lldb") is None, reason="lldb not installed")


def lldb(port: int, elf: Path, *commands: str, timeout: float = 60) -> str:
    args = ["lldb", "--no-lldbinit", "-b", str(elf), "-o", f"gdb-remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-o", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return out.stdout + out.stderr


def reg(text: str, name: str) -> int:
    m = re.search(rf"\b{name} = (0x[0-9a-f]+)", text)
    assert m, f"{name} not in lldb output:\n{text}"
    return int(m.group(1), 16)


def test_lldb_registers_breakpoint_step_and_memory(guests: Path) -> None:
    elf = guests / "longmode.elf"
    sym = symbols(elf)
    with Server(elf) as srv:
        out = lldb(
            srv.port,
            elf,
            "register read rip cr3 efer fs_base",
            "breakpoint set -n main_loop",
            "continue",
            "register read rip cr3",
            "memory read -s1 -c16 -fc 0xffff800000001000",
            "stepi",
            "register read rip",
        )
        assert srv.alive()
    rips = [int(x, 16) for x in re.findall(r"\brip = (0x[0-9a-f]+)", out)]
    assert rips[0] == sym["_start"], out
    assert rips[1] == sym["main_loop"], out
    assert rips[2] != rips[1]
    cr3s = [int(x, 16) for x in re.findall(r"\bcr3 = (0x[0-9a-f]+)", out)]
    assert cr3s[1] == sym["kernel_pml4"]
    assert reg(out, "efer") & 0x500 == 0x500
    assert "HIGHHALF-MARKER" in out


def test_lldb_exit_detaches_not_kills(guests: Path) -> None:
    elf = guests / "longmode.elf"
    sym = symbols(elf)
    with Server(elf) as srv:
        lldb(srv.port, elf, "breakpoint set -n tick", "continue")  # lldb -b sends k on exit
        assert srv.alive()
        c = RspClient(srv.port)
        c.no_ack()
        assert c.request(b"m%x,1" % sym["tick"]) != b"cc"
        c.close()
