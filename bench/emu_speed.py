"""Speed of the emulated backend against a bare Unicorn loop on the same guest code.

    .venv/bin/python bench/emu_speed.py [--seconds 0.5] [--repeat 3]
    .venv/bin/python bench/emu_speed.py --step [--rounds 2000]

The guest is a five-instruction loop that increments a counter in memory;
instructions per second = 5 * counter / wall time.  "bare Unicorn" runs the
same image (loaded by the same loader, same boot state) in one Uc with no hooks,
stopped by emu_stop from a timer thread.  The EmuDomain rows run the domain
free (its vCPU thread, console and interrupt hooks installed) with the named
debugging features armed but never hit, then pause and read the counter.

``--step`` measures the debugger's single-step round trip instead: the engine's
``Session.step`` followed by ``Session.registers`` (what every GDB ``stepi``
costs in-process), ``get_registers`` alone, and the backend-level step event.
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL
from unicorn import x86_const as x86
from unicorn.unicorn_py3.arch.intel import UcIntel
from unicorn.unicorn_py3.unicorn import Uc

from xendbg.backend.base import Access, EventKind, Response
from xendbg.backend.emu import EmuDomain
from xendbg.backend.emu.loader import SEL_CODE, SEL_DATA, install, load_image
from xendbg.backend.emu.ram import GuestRam
from xendbg.engine.session import Session
from xendbg.engine.stops import StopReason

INSNS_PER_PASS = 5
SOURCE = """
.code64
.globl _start
.text
_start:
  mov $counter, %rbx
loop:
  incq (%rbx)
  add $3, %rax
  xor %rcx, %rax
  dec %rdx
  jmp loop
spare:
  nop
.data
counter: .quad 0
.balign 4096
other: .quad 0
"""


def build(tmp: Path) -> tuple[Path, dict[str, int]]:
    (tmp / "g.S").write_text(SOURCE)
    subprocess.run(["as", "--64", "-o", str(tmp / "g.o"), str(tmp / "g.S")], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-Ttext", "0x100000",
         "-Tdata", "0x200000", "-o", str(tmp / "g.elf"), str(tmp / "g.o")],
        check=True,
    )  # fmt: skip
    nm = subprocess.run(["nm", str(tmp / "g.elf")], check=True, capture_output=True, text=True)
    syms = {line.split()[2]: int(line.split()[0], 16) for line in nm.stdout.splitlines()}
    return tmp / "g.elf", syms


def bare_unicorn(path: Path, counter: int, seconds: float) -> float:
    image = load_image(path)
    ram = GuestRam(64 << 20)
    boot = install(image, ram)
    uc = cast(UcIntel, Uc(UC_ARCH_X86, UC_MODE_64))  # Uc() returns the arch subclass
    uc.mem_map_ptr(0, ram.size, UC_PROT_ALL, ram.host_address)
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, boot.gdt_base, boot.gdt_limit, 0))
    uc.msr_write(0xC0000080, boot.efer)
    uc.reg_write(x86.UC_X86_REG_CR4, boot.cr4)
    uc.reg_write(x86.UC_X86_REG_CR3, boot.cr3)
    uc.reg_write(x86.UC_X86_REG_CR0, boot.cr0)
    uc.reg_write(x86.UC_X86_REG_CS, SEL_CODE)
    uc.reg_write(x86.UC_X86_REG_SS, SEL_DATA)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    timer = threading.Timer(seconds, uc.emu_stop)
    start = time.perf_counter()
    timer.start()
    uc.emu_start(boot.entry, 0)
    elapsed = time.perf_counter() - start
    passes: int = struct.unpack("<Q", ram.read(counter, 8))[0]
    return INSNS_PER_PASS * passes / elapsed


def domain_speed(
    path: Path, counter: int, seconds: float, setup: Callable[[EmuDomain], None]
) -> float:
    with EmuDomain(path, start_paused=True) as d:
        setup(d)
        start = time.perf_counter()
        d.unpause()
        time.sleep(seconds)
        d.pause()
        elapsed = time.perf_counter() - start
        passes: int = struct.unpack("<Q", d.read_phys(counter, 8))[0]
        return INSNS_PER_PASS * passes / elapsed


def stop_latencies(path: Path, syms: dict[str, int], rounds: int = 300) -> dict[str, float]:
    """Microseconds per operation of the debugger's common round trips."""
    out = {}
    with EmuDomain(path) as d:
        time.sleep(0.05)
        spent = 0.0
        for _ in range(rounds // 10):
            time.sleep(0.002)  # the vCPU is deep in emu_start
            t = time.perf_counter()
            d.pause()
            spent += time.perf_counter() - t
            d.unpause()
        out["pause() of a running vCPU"] = spent / (rounds // 10) * 1e6
        d.pause()
        t = time.perf_counter()
        for _ in range(rounds):
            d.get_registers(0)
        out["get_registers (all, stopped vCPU)"] = (time.perf_counter() - t) / rounds * 1e6
        d.set_singlestep(0, True)
        d.unpause()
        t = time.perf_counter()
        for _ in range(rounds):
            ev = d.poll_event(5)
            assert ev is not None and ev.kind is EventKind.SINGLESTEP
            d.resume(ev)
        out["single-step event + resume"] = (time.perf_counter() - t) / rounds * 1e6
        ev = d.poll_event(5)
        assert ev is not None
        d.resume(ev, Response(singlestep=False))
    return out


def _per_call(fn: Callable[[], object], rounds: int) -> float:
    """Microseconds per call of ``fn``: the median of five batches (the machine is shared)."""
    batch = max(1, rounds // 5)
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t) / batch * 1e6)
    return sorted(samples)[2]


def step_latencies(path: Path, syms: dict[str, int], rounds: int) -> dict[str, float]:
    """Microseconds per single-step round trip, engine and backend level."""
    out = {}
    with EmuDomain(path, start_paused=True) as d:
        s = Session(d)
        d.unpause()  # drop start_paused: the session holds its own pause
        try:

            def engine_step() -> None:
                stop = s.step(0)
                assert stop.reason is StopReason.STEP, stop
                s.registers(0)

            out["Session.step + Session.registers"] = _per_call(engine_step, rounds)
            out["get_registers (all, stopped vCPU)"] = _per_call(lambda: d.get_registers(0), rounds)
            rip = s.pc(0)
            assert syms["_start"] < rip < syms["spare"], "the steps left the loop"
        finally:
            s.detach()
        d.pause()
        d.set_singlestep(0, True)
        d.unpause()
        held = [d.poll_event(5)]

        def backend_step() -> None:
            ev = held[0]
            assert ev is not None and ev.kind is EventKind.SINGLESTEP
            d.resume(ev)
            held[0] = d.poll_event(5)

        out["resume + SINGLESTEP event (backend)"] = _per_call(backend_step, rounds)
        ev = held[0]
        assert ev is not None
        d.resume(ev, Response(singlestep=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="run time per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--step", action="store_true", help="single-step round trips instead")
    ap.add_argument("--rounds", type=int, default=2000, help="steps per --step measurement")
    args = ap.parse_args()
    if args.step:
        with tempfile.TemporaryDirectory() as tmp:
            path, syms = build(Path(tmp))
            step = step_latencies(path, syms, args.rounds)
        print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
        print(f"{'operation':42s} {'µs':>9s}")
        for label, us in step.items():
            print(f"{label:42s} {us:9.1f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path, syms = build(Path(tmp))
        counter = syms["counter"]
        rows: list[tuple[str, float]] = [
            ("bare Unicorn (no hooks)", bare_unicorn(path, counter, args.seconds))
        ]

        def nothing(d: EmuDomain) -> None:
            pass

        def dr_exec(d: EmuDomain) -> None:
            d.set_registers(0, {"dr0": syms["spare"], "dr7": 0x401})

        def int3_monitor(d: EmuDomain) -> None:
            d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
            d.monitor(EventKind.DEBUG_EXCEPTION, True)

        def mem_access(d: EmuDomain) -> None:
            d.set_mem_access(syms["other"] >> 12, Access.R)

        def cr_monitor(d: EmuDomain) -> None:
            d.monitor(EventKind.WRITE_CTRLREG, True, index=3)

        for label, setup in (
            ("EmuDomain, free-running", nothing),
            ("EmuDomain, int3/#DB monitored", int3_monitor),
            ("EmuDomain, DR0 exec bp armed elsewhere", dr_exec),
            ("EmuDomain, mem_access on another page", mem_access),
            ("EmuDomain, CR3 write monitoring", cr_monitor),
        ):
            best = max(domain_speed(path, counter, args.seconds, setup) for _ in range(args.repeat))
            rows.append((label, best))
        latencies = stop_latencies(path, syms)
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{'configuration':42s} {'M insn/s':>9s} {'vs bare':>8s}")
    base = rows[0][1]
    for label, ips in rows:
        print(f"{label:42s} {ips / 1e6:9.1f} {ips / base:8.0%}")
    print()
    print(f"{'operation':42s} {'µs':>9s}")
    for label, us in latencies.items():
        print(f"{label:42s} {us:9.1f}")


if __name__ == "__main__":
    main()
