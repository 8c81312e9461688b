"""Real gdb in dom0 against `xendbg serve --attach NAME`: ``pvh-gdb-session`` (registers with
cr3, higher-half memory, stepi through TF + debug-exception events, detach) and
``pv-breakpoint`` (a breakpoint on a PV guest with the spin strategy, continue, stepi).

After each session: the guest runs on (its counter keeps printing, ``xl list`` shows it
unpaused), its code pages equal the image again, and a second full attach succeeds.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from labkit import (
    GUESTS,
    LONGMODE_BANNER,
    PV_BANNER,
    PY_ENV,
    Background,
    Guest,
    check,
    create_guest,
    domains,
    last_counter,
    log,
    run,
    scenario,
    verified,
    wait_console,
)

KERNEL_PML4 = 0x105000  # longmode.elf's kernel_pml4
HEX = r"0x[0-9a-f]+"


def serve(guest: Guest, port: int, *extra: str) -> Background:
    server = Background(
        [sys.executable, "-m", "xendbg.frontend.cli", "serve", "--attach", guest.name,
         "--port", str(port), *extra],
        env=PY_ENV,
    )  # fmt: skip
    server.wait_for(rf"domain {guest.domid} \({re.escape(guest.name)}\) on port {port}\b", 60)
    return server


def gdb(elf: str, port: int, commands: Sequence[str], timeout: float = 180.0) -> str:
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"file {elf}", "-ex", f"target remote 127.0.0.1:{port}",
            "-ex", "echo @@live\\n", "-ex", "p/x $pc"]  # fmt: skip
    for c in commands:
        argv += ["-ex", c]
    proc = run(argv, timeout=timeout, check_rc=False)
    out = proc.stdout + proc.stderr
    # Unconnected, gdb still reads memory from the ELF, but it has no registers.
    live = re.search(rf"^\$\d+ = {HEX}$", section(out, "live"), re.M)
    check(live is not None, f"gdb did not connect to port {port}")
    return out


def section(out: str, name: str) -> str:
    """gdb's output between `echo @@name` and the next marker."""
    m = re.search(rf"^@@{name}\n(.*?)(?=^@@|\Z)", out, re.M | re.S)
    check(m is not None, f"no @@{name} section in gdb's output:\n{out}")
    assert m is not None
    return m.group(1)


def detached(out: str) -> bool:
    return re.search(r"^\[Inferior 1 \(Remote target\) detached\]", section(out, "detach"),
                     re.M) is not None  # fmt: skip


def step_commands(i: int) -> list[str]:
    return [f"echo @@before{i}\\n", "x/2i $pc", "x/gx $sp", "stepi",
            f"echo @@after{i}\\n", "p/x $pc"]  # fmt: skip


def check_step(out: str, i: int) -> str:
    """The pc after `stepi` is where the instruction before it goes (gdb's disassembly)."""
    before = section(out, f"before{i}")
    insns = re.findall(rf"^(?:=>)?\s+({HEX})[^:]*:\s+(\S+)\s*(.*)$", before, re.M)
    check(len(insns) == 2, f"x/2i: {before!r}")
    (pc, mnemonic, operands), (fall, _, _) = insns
    stack = re.search(rf"^{HEX}[^:]*:\s+({HEX})", before, re.M)
    check(stack is not None, f"x/gx $sp: {before!r}")
    assert stack is not None
    after = re.search(rf"\$\d+ = ({HEX})", section(out, f"after{i}"))
    check(after is not None, f"p/x $pc after stepi {i}")
    assert after is not None
    target = re.match(rf"({HEX})", operands)
    if mnemonic.startswith("ret"):
        allowed = {int(stack.group(1), 16)}
    elif mnemonic.startswith(("call", "jmp")) and target:
        allowed = {int(target.group(1), 16)}
    elif mnemonic.startswith("j") and target:
        allowed = {int(target.group(1), 16), int(fall, 16)}
    else:
        allowed = {int(fall, 16)}
    new_pc = int(after.group(1), 16)
    check(new_pc in allowed, f"stepi {i} from {pc} ({mnemonic} {operands}) went to {new_pc:#x}")
    log(f"stepi {i}: {pc} {mnemonic} {operands} -> {new_pc:#x}")
    return after.group(1)


def runs_on(guest: Guest, elf: str) -> None:
    """The clean-detach checks: running, counting, code as the image, re-attachable."""
    check(guest.name in {d.name for d in domains()}, "the guest is gone")
    printed = last_counter(guest)
    wait_console(guest, f"counter=0x{printed + (1 << 20):016x}", timeout=60)
    verified(guest, elf)  # code equal to the image: no int3 or jmp $ left behind


@scenario("pvh-gdb-session", timeout=360)
def pvh_gdb_session() -> None:
    guest = create_guest("longmode-pvh.cfg", "xenlab-gdb", LONGMODE_BANNER)
    elf = str(GUESTS / "longmode.elf")
    wait_console(guest, "vcpu 0 counter=0x")
    with serve(guest, 1234) as server:
        cmds = ["echo @@regs\\n", "info registers rip cr3", "echo @@hh\\n",
                "x/s 0xffff800000001000", "echo @@counter\\n", "x/gx &counter"]  # fmt: skip
        for i in range(3):
            cmds += step_commands(i)
        cmds += ["echo @@detach\\n", "detach"]
        out = gdb(elf, 1234, cmds)
        regs = section(out, "regs")
        cr3 = re.search(rf"^cr3\s+({HEX})", regs, re.M)
        check(cr3 is not None and int(cr3.group(1), 16) & ~0xFFF == KERNEL_PML4,
              f"cr3 is not kernel_pml4: {regs!r}")  # fmt: skip
        check(re.search(r"^rip\s+0xffffffff801", regs, re.M) is not None, f"rip: {regs!r}")
        check('"HIGHHALF-MARKER"' in section(out, "hh"), "x/s at the higher-half address")
        counter = re.search(rf"<counter>:\s+({HEX})", section(out, "counter"))
        # The live counter, not the image's 0 (gdb falls back to the ELF when not connected).
        check(counter is not None and int(counter.group(1), 16) > 0, "counter not read live")
        for i in range(3):
            check_step(out, i)
        check(detached(out), "gdb did not detach")
        check(server.proc.poll() is None, "the server exited after the client detached")
        runs_on(guest, elf)  # while the server still listens: nothing held
    check(server.proc.returncode == 0, f"serve exit status {server.proc.returncode}")


@scenario("pv-breakpoint", timeout=360)
def pv_breakpoint() -> None:
    """PV traps never reach dom0 (no gdbsx in Debian's Xen), so breakpoints are the spin
    strategy's `jmp $`; this needs `serve --breakpoints spin`."""
    guest = create_guest("pv64-pv.cfg", "xenlab-pvbp", PV_BANNER, pv_console=True)
    elf = str(GUESTS / "pv64.elf")
    wait_console(guest, "vcpu 0 counter=0x")
    with serve(guest, 1235, "--breakpoints", "spin") as server:
        cmds = ["break tick", "echo @@cont\\n", "continue", "echo @@pc\\n", "p/x $pc",
                "p $pc == &tick", *step_commands(0), "delete", "echo @@detach\\n",
                "detach"]  # fmt: skip
        out = gdb(elf, 1235, cmds)
        check(re.search(r"Breakpoint 1, .*tick", section(out, "cont")) is not None,
              "continue did not stop at tick")  # fmt: skip
        check(re.search(r"^\$\d+ = 1$", section(out, "pc"), re.M) is not None, "pc != tick")
        check_step(out, 0)
        check(detached(out), "gdb did not detach")
        check(server.proc.poll() is None, "the server exited after the client detached")
        runs_on(guest, elf)
    check(server.proc.returncode == 0, f"serve exit status {server.proc.returncode}")
