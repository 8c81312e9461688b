"""xendbg's GDB server vs QEMU's gdbstub (TCG) on the same guest, in one run.

Both run build/guests/longmode.elf: xendbg emulates it (`xendbg serve --emu`),
QEMU boots it through its PVH note (`qemu-system-x86_64 -kernel … -s -S`).
Each is first run to `main_loop` (the guest's own page tables live), then:

  stepi     gdb `stepi` N times in one batch session → steps per second
  step+g    raw client (ack mode: QEMU 7.2 lacks QStartNoAckMode): vCont;s + g → µs per step
  read      gdb `dump binary memory` of 16 MiB of identity-mapped RAM → MiB/s
  m-read    raw client, 1 MiB in 0x7f0-byte m packets → ms

Usage: .venv/bin/python bench/gdbstub_compare.py build/guests/longmode.elf
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from elftools.elf.elffile import ELFFile

from serverproc import RspClient


def symbol(elf: Path, name: str) -> int:
    with elf.open("rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)
        return int(sym[0]["st_value"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def xendbg_server(elf: Path) -> Iterator[int]:
    cmd = [sys.executable, "-m", "xendbg.frontend.cli", "serve", "--emu", str(elf), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    m = re.search(r":(\d+) \(target remote", proc.stdout.readline())
    assert m, "xendbg serve did not start"
    try:
        yield int(m.group(1))
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def qemu_server(elf: Path) -> Iterator[int]:
    port = free_port()
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-m",
        "128M",
        "-display",
        "none",
        "-serial",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        str(elf),
        "-gdb",
        f"tcp:127.0.0.1:{port}",
        "-S",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    # QEMU accepts one gdb connection at a time; the probe above used it up once.
    try:
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def gdb_timed(port: int, elf: Path, cmds: list[str]) -> float:
    """Seconds gdb spends on ``cmds`` (timed inside gdb, after reaching main_loop)."""
    args = [
        "gdb",
        "-nx",
        "-batch",
        "-ex",
        "set pagination off",
        "-ex",
        f"file {elf}",
        "-ex",
        f"target remote 127.0.0.1:{port}",
        "-ex",
        "hbreak *main_loop",
        "-ex",
        "continue",
        "-ex",
        "delete",
        "-ex",
        "python import time; _t0 = time.perf_counter()",
    ]
    for c in cmds:
        args += ["-ex", c]
    args += ["-ex", "python print('ELAPSED %.6f' % (time.perf_counter() - _t0))"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    m = re.search(r"ELAPSED ([0-9.]+)", out.stdout)
    assert m, (out.stdout + out.stderr)[-800:]
    return float(m.group(1))


def run_to_main_loop(c: RspClient, main_loop: int) -> None:
    assert c.request(b"Z1,%x,1" % main_loop) == b"OK"
    for _ in range(3):
        reply = c.request(b"vCont;c")
        assert reply.startswith(b"T"), reply
        pc = c.request(b"p10")
        if int.from_bytes(bytes.fromhex(pc.decode()), "little") == main_loop:
            break
    assert c.request(b"z1,%x,1" % main_loop) == b"OK"


def raw_step_g(port: int, main_loop: int, n: int) -> float:
    c = RspClient(port)
    c.request(b"qSupported:swbreak+;hwbreak+")
    run_to_main_loop(c, main_loop)
    t0 = time.perf_counter()
    for _ in range(n):
        assert c.request(b"vCont;s:1").startswith(b"T")
        c.request(b"g")
    dt = time.perf_counter() - t0
    c.close()
    return dt / n * 1e6


def raw_read(port: int, main_loop: int, total: int) -> float:
    c = RspClient(port)
    run_to_main_loop(c, main_loop)
    t0 = time.perf_counter()
    addr = 0x100000
    end = addr + total
    while addr < end:
        n = min(0x7F0, end - addr)
        data = c.request(b"m%x,%x" % (addr, n))
        assert len(data) == 2 * n, data[:20]
        addr += n
    dt = time.perf_counter() - t0
    c.close()
    return dt * 1e3


def measure(
    name: str, server: Callable[[Path], object], elf: Path, args: argparse.Namespace
) -> dict[str, float]:
    main_loop = symbol(elf, "main_loop")
    res: dict[str, float] = {}
    with server(elf) as port:  # type: ignore[attr-defined]
        t = gdb_timed(port, elf, ["stepi"] * args.steps)
        res["gdb stepi /s"] = args.steps / t
    with server(elf) as port:  # type: ignore[attr-defined]
        res["raw step+g µs"] = raw_step_g(port, main_loop, args.raw_steps)
    with server(elf) as port:  # type: ignore[attr-defined]
        res["raw 1 MiB m ms"] = raw_read(port, main_loop, 1 << 20)
    with server(elf) as port, tempfile.TemporaryDirectory() as d:  # type: ignore[attr-defined]
        dump = os.path.join(d, "mem.bin")
        size = args.dump_mib << 20
        t = gdb_timed(port, elf, [f"dump binary memory {dump} 0x0 {size:#x}"])
        assert os.path.getsize(dump) == size
        res["gdb dump MiB/s"] = args.dump_mib / t
    print(f"  {name}: " + ", ".join(f"{k} = {v:.1f}" for k, v in res.items()), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("elf", type=Path)
    ap.add_argument("--steps", type=int, default=500, help="gdb stepi count")
    ap.add_argument("--raw-steps", type=int, default=2000, help="raw step+g round trips")
    ap.add_argument("--dump-mib", type=int, default=16, help="gdb dump size in MiB")
    args = ap.parse_args()
    print(f"command: {' '.join(sys.argv)}")
    rows = {
        "xendbg": measure("xendbg", xendbg_server, args.elf, args),
        "qemu": measure("qemu gdbstub", qemu_server, args.elf, args),
    }
    keys = list(rows["xendbg"])
    print("\n| measure | xendbg | QEMU 7.2 gdbstub (TCG) | better |")
    print("|---|---|---|---|")
    for k in keys:
        x, q = rows["xendbg"][k], rows["qemu"][k]
        higher_is_better = "/s" in k
        win = "xendbg" if (x >= q) == higher_is_better else "qemu"
        print(f"| {k} | {x:.1f} | {q:.1f} | {win} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
