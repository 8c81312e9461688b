"""Spin breakpoints (`jmp $`) and software single-step on real Unicorn vCPUs.

The emulated domain offers every event source; ``CapabilityMask`` (a test
double of *capabilities* only: every operation goes to the real EmuDomain)
announces fewer, as a Xen PV domain does (no int3, MTF, #DB, debug-register
or page-access events; with or without PAUSE_VCPU), so that the engine must
use spin breakpoints and software single-step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs

from elfsyms import symbols
from polling import wait_until
from xendbg.backend.base import Capability, Domain, Event, EventKind, Response
from xendbg.backend.emu import EmuDomain
from xendbg.engine.session import (
    POLL_MAX,
    POLL_MIN,
    BreakpointStrategy,
    Session,
    StepStrategy,
)
from xendbg.engine.spin import JMP_SELF
from xendbg.engine.stops import StopReason
from xendbg.errors import GuestMemoryFault, Unsupported, XendbgError

TIMEOUT = 10.0
TRAPS = (
    Capability.SOFTWARE_BREAKPOINT
    | Capability.SINGLESTEP
    | Capability.DEBUG_EXCEPTION
    | Capability.DEBUG_REGISTERS
    | Capability.MEM_ACCESS
    | Capability.WRITE_CTRLREG
    | Capability.INJECT_TRAP
)
PV_LIKE = TRAPS | Capability.PAUSE_VCPU  # what XenDomain offers a PV guest
KERNEL_VIRT_BASE = 0xFFFFFFFF80000000

_MONITOR_CAPS = {
    EventKind.SOFTWARE_BREAKPOINT: Capability.SOFTWARE_BREAKPOINT,
    EventKind.SINGLESTEP: Capability.SINGLESTEP,
    EventKind.DEBUG_EXCEPTION: Capability.DEBUG_EXCEPTION,
    EventKind.MEM_ACCESS: Capability.MEM_ACCESS,
    EventKind.WRITE_CTRLREG: Capability.WRITE_CTRLREG,
}


class CapabilityMask(Domain):
    """Test double: the real ``inner`` domain, announcing fewer capabilities.

    Operations of a hidden capability raise Unsupported, so an engine that used
    one anyway fails the test instead of quietly getting the emulator's help.
    """

    def __init__(self, inner: EmuDomain, hide: Capability) -> None:
        self.inner = inner
        self.domid = inner.domid
        self.name = inner.name
        self.guest_type = inner.guest_type
        self.word_size = inner.word_size
        self.vcpu_count = inner.vcpu_count
        self.capabilities = inner.capabilities & ~hide

    def pause(self) -> None:
        self.inner.pause()

    def unpause(self) -> None:
        self.inner.unpause()

    @property
    def paused(self) -> bool:
        return self.inner.paused

    def pause_vcpu(self, vcpu: int) -> None:
        self.require(Capability.PAUSE_VCPU, "pause_vcpu")
        self.inner.pause_vcpu(vcpu)

    def unpause_vcpu(self, vcpu: int) -> None:
        self.require(Capability.PAUSE_VCPU, "unpause_vcpu")
        self.inner.unpause_vcpu(vcpu)

    def read_phys(self, gpa: int, size: int) -> bytes:
        return self.inner.read_phys(gpa, size)

    def write_phys(self, gpa: int, data: bytes) -> None:
        self.inner.write_phys(gpa, data)

    def get_registers(self, vcpu: int) -> dict[str, int]:
        return self.inner.get_registers(vcpu)

    def set_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        if any(n.startswith("dr") for n in values):
            self.require(Capability.DEBUG_REGISTERS, "debug registers")
        self.inner.set_registers(vcpu, values)

    def monitor(self, kind: EventKind, enable: bool, *, index: int | None = None) -> None:
        self.require(_MONITOR_CAPS.get(kind, Capability.CPUID), f"monitor {kind.value}")
        self.inner.monitor(kind, enable, index=index)

    def set_singlestep(self, vcpu: int, enable: bool) -> None:
        self.require(Capability.SINGLESTEP, "set_singlestep")
        self.inner.set_singlestep(vcpu, enable)

    def event_fd(self) -> int:
        return self.inner.event_fd()

    def poll_event(self, timeout: float | None = 0.0) -> Event | None:
        return self.inner.poll_event(timeout)

    def resume(self, event: Event, response: Response | None = None) -> None:
        self.inner.resume(event, response)

    def close(self) -> None:
        self.inner.detach()


@pytest.fixture
def sym(guests: Path) -> dict[str, int]:
    return symbols(guests / "longmode.elf")


@pytest.fixture
def emu(guests: Path) -> Iterator[EmuDomain]:
    d = EmuDomain(guests / "longmode.elf", start_paused=True)
    yield d
    d.close()


def attach(dom: EmuDomain, hide: Capability = PV_LIKE, **kw: str) -> Session:
    s = Session(CapabilityMask(dom, hide) if hide else dom, **kw)
    dom.unpause()  # drop the creation pause: the session holds its own
    return s


@pytest.fixture
def pv(emu: EmuDomain) -> Iterator[Session]:
    s = attach(emu)
    yield s
    s.detach()


def u64(s: Session, addr: int, vcpu: int = 0) -> int:
    return int.from_bytes(s.read_memory(vcpu, addr, 8), "little")


def run_to(s: Session, addr: int) -> None:
    s.insert_breakpoint(addr)
    stop = s.cont(TIMEOUT)
    assert stop is not None and stop.reason is StopReason.SW_BREAKPOINT and stop.pc == addr, stop
    assert s.remove_breakpoint(addr)


def indirect_jump_in_start(s: Session, sym: dict[str, int]) -> int:
    """Address of `jmp *%rax` at the end of longmode's _start (into the higher half)."""
    code = s.read_memory(0, sym["_start"], 0x100)
    for insn in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, sym["_start"]):
        if insn.mnemonic == "jmp" and insn.op_str == "rax":
            return int(insn.address)
    raise AssertionError("no jmp rax in _start")


def to_main_loop(s: Session, sym: dict[str, int]) -> None:
    """Reach main_loop without debug registers: main_loop's page is mapped only once
    the guest has its own tables, so stop at the low jump into the higher half first."""
    run_to(s, indirect_jump_in_start(s, sym))
    run_to(s, sym["main_loop"])


def instruction_length(s: Session, addr: int) -> int:
    bits = CS_MODE_64 if s.domain.word_size == 8 else CS_MODE_32
    insn = next(Cs(CS_ARCH_X86, bits).disasm(s.read_memory(0, addr, 16), addr, 1))
    return int(insn.size)


# -- strategy choice ---------------------------------------------------------------
def test_strategies_follow_capabilities(emu: EmuDomain) -> None:
    full = Session(emu)
    assert (full.breakpoints, full.stepping) == (BreakpointStrategy.INT3, StepStrategy.HYPERVISOR)
    full.detach()
    forced = Session(emu, breakpoints="spin")
    assert (forced.breakpoints, forced.stepping) == (
        BreakpointStrategy.SPIN,
        StepStrategy.HYPERVISOR,
    )
    forced.detach()
    tf = Session(CapabilityMask(emu, Capability.SINGLESTEP | Capability.SOFTWARE_BREAKPOINT))
    assert (tf.breakpoints, tf.stepping) == (BreakpointStrategy.SPIN, StepStrategy.TRAP_FLAG)
    tf.detach()
    pv = Session(CapabilityMask(emu, PV_LIKE))
    assert (pv.breakpoints, pv.stepping) == (BreakpointStrategy.SPIN, StepStrategy.SOFTWARE)
    pv.detach()
    with pytest.raises(Unsupported, match="int3"):
        Session(CapabilityMask(emu, PV_LIKE), breakpoints="int3")
    with pytest.raises(XendbgError, match="unknown breakpoint strategy"):
        Session(emu, breakpoints="hlt")
    assert emu.paused  # only the creation pause is left: every session let go of its own


# -- breakpoints -------------------------------------------------------------------------
def test_breakpoint_by_symbol_counts_each_pass(pv: Session, sym: dict[str, int]) -> None:
    # No debug registers: an unmapped address cannot hold a breakpoint yet.
    with pytest.raises(GuestMemoryFault):
        pv.insert_breakpoint(sym["main_loop"])
    assert pv.poll_interval is None  # stopped, nothing planted
    to_main_loop(pv, sym)
    assert pv.registers(0)["cr3"] == sym["kernel_pml4"]
    tick = sym["tick"]
    original = pv.read_memory(0, tick, 4)
    gpa = pv.translate(0, tick)
    pv.insert_breakpoint(tick)
    assert pv.domain.read_phys(gpa, 2) == JMP_SELF  # really planted …
    assert pv.read_memory(0, tick, 4) == original  # … never shown
    assert pv.read_phys(gpa, 4) == original
    counts = []
    for _ in range(4):
        stop = pv.cont(TIMEOUT)
        assert stop is not None and stop.reason is StopReason.SW_BREAKPOINT, stop
        assert stop.pc == tick and pv.pc(0) == tick
        counts.append(u64(pv, sym["counter"]))
    assert [c - counts[0] for c in counts] == [0, 1, 2, 3]
    # A write over the patch updates the saved bytes and keeps the patch.
    pv.write_memory(0, tick, original[:2])
    assert pv.domain.read_phys(gpa, 2) == JMP_SELF
    assert pv.remove_breakpoint(tick)
    assert pv.domain.read_phys(gpa, 4) == original
    assert not pv.remove_breakpoint(tick)


def test_one_byte_instruction_at_a_breakpoint(pv: Session, sym: dict[str, int]) -> None:
    to_main_loop(pv, sym)
    compute = sym["compute"]
    assert instruction_length(pv, compute) == 1  # push %rbp: jmp $ spills into mov %rsp,%rbp
    pv.insert_breakpoint(compute)
    with pytest.raises(Unsupported, match="overlap"):
        pv.insert_breakpoint(compute + 1)
    gpa = pv.translate(0, compute)
    seen: list[int] = []
    for _ in range(3):
        stop = pv.cont(TIMEOUT)
        assert stop is not None and stop.pc == compute, stop
        counter = u64(pv, sym["counter"])
        assert pv.registers(0)["rdi"] == counter  # compute(counter)
        if seen:  # the last pass ran compute with its own bytes: right result, one pass
            assert counter == seen[-1] + 1
            assert u64(pv, sym["result"]) == counter**2  # (previous counter + 1)^2
        seen.append(counter)
    last = seen[-1]
    # Step onto the clobbered byte: memory shows the guest's, the patch stays.
    after = pv.step(0)
    assert after.reason is StopReason.STEP and after.pc == compute + 1
    assert pv.domain.read_phys(gpa, 2) == JMP_SELF
    assert pv.read_memory(0, compute, 4) == bytes.fromhex("554889e5")
    # Continue from inside the patch: stepped out first, then the next pass.
    stop = pv.cont(TIMEOUT)
    assert stop is not None and stop.pc == compute
    assert u64(pv, sym["counter"]) == last + 1
    assert u64(pv, sym["result"]) == (last + 1) ** 2


def test_spin_breakpoints_with_hypervisor_steps(emu: EmuDomain, sym: dict[str, int]) -> None:
    s = attach(emu, Capability.NONE, breakpoints="spin")
    try:
        run_to(s, sym["main_loop"])  # unmapped: a debug register stands in
        s.insert_breakpoint(sym["compute"])
        first = s.cont(TIMEOUT)
        assert first is not None and first.pc == sym["compute"]
        c = u64(s, sym["counter"])
        assert s.step(0).pc == sym["compute"] + 1
        assert s.step(0).pc == sym["compute"] + 4
        again = s.cont(TIMEOUT)
        assert again is not None and again.pc == sym["compute"]
        assert u64(s, sym["counter"]) == c + 1
    finally:
        s.detach()


# -- software single-step ----------------------------------------------------------------
def trace(s: Session, n: int) -> list[tuple[int, int, int]]:
    out = []
    for _ in range(n):
        stop = s.step(0)
        assert stop.reason is StopReason.STEP, stop
        r = s.registers(0)
        out.append((stop.pc, r["rsp"], r["rax"]))
    return out


@pytest.mark.parametrize("guest", ["longmode.elf", "i386.elf"])
def test_software_step_matches_hypervisor_step(guests: Path, guest: str) -> None:
    """The same guest twice: MTF steps (int3 breakpoints) against software steps
    (spin breakpoints), instruction by instruction: PC, stack pointer and RAX."""
    sym = symbols(guests / guest)
    ref_dom = EmuDomain(guests / guest, start_paused=True)
    sw_dom = EmuDomain(guests / guest, start_paused=True)
    ref = attach(ref_dom, Capability.NONE)
    sw = attach(sw_dom)
    try:
        assert ref.stepping is StepStrategy.HYPERVISOR
        assert sw.stepping is StepStrategy.SOFTWARE
        if guest == "longmode.elf":
            # Through jmp *%rax into the higher half, call, jz, puts' loop.
            jump = indirect_jump_in_start(sw, sym)
            run_to(ref, jump)
            run_to(sw, jump)
            assert trace(sw, 25) == trace(ref, 25)
        run_to(ref, sym["main_loop"])
        run_to(sw, sym["main_loop"])
        expected = trace(ref, 60)
        got = trace(sw, 60)
        assert got == expected
        pcs = {pc for pc, _, _ in got}
        assert {sym["tick"], sym["compute"], sym["main_loop"]} <= pcs  # calls, rets, jcc
        assert u64(sw, sym["counter"]) == u64(ref, sym["counter"])
        # Nothing of ours is left in memory between steps.
        gpa = sw.translate(0, sym["main_loop"]) & ~0xFFF
        assert sw_dom.read_phys(gpa, 0x1000) == ref_dom.read_phys(gpa, 0x1000)
    finally:
        ref.detach()
        sw.detach()
        ref_dom.close()
        sw_dom.close()


def test_step_of_jmp_to_itself_ends_at_once(pv: Session, sym: dict[str, int]) -> None:
    to_main_loop(pv, sym)
    # Park the vCPU on a guest-written `jmp $` of its own, in the unused stack bottom.
    spot = sym["stacks"] + 0x100
    pv.write_memory(0, spot, JMP_SELF)
    pv.set_registers(0, {"rip": spot})
    assert pv.step(0).pc == spot
    assert pv.step(0).pc == spot


def test_interrupt_while_polling(pv: Session, sym: dict[str, int]) -> None:
    to_main_loop(pv, sym)
    pv.insert_breakpoint(sym["hh_data"])  # data: never executed, polled all the same
    pv.resume()
    assert pv.poll_interval is not None and POLL_MIN <= pv.poll_interval <= POLL_MAX
    assert pv.wait(0) is None
    t = threading.Timer(0.1, pv.interrupt)
    t.start()
    stop = pv.wait(TIMEOUT)
    t.join()
    assert stop is not None and stop.reason is StopReason.INTERRUPT
    assert pv.poll_interval is None


# -- detach --------------------------------------------------------------------------------
def counter_phys(dom: EmuDomain, sym: dict[str, int]) -> int:
    return int.from_bytes(dom.read_phys(sym["counter"] - KERNEL_VIRT_BASE, 8), "little")


@pytest.mark.parametrize("state", ["parked", "inside-patch", "running"])
def test_detach_leaves_no_trace(emu: EmuDomain, sym: dict[str, int], state: str) -> None:
    s = attach(emu)
    to_main_loop(s, sym)
    page = s.translate(0, sym["tick"]) & ~0xFFF
    before = emu.read_phys(page, 0x1000)
    s.insert_breakpoint(sym["tick"])
    s.insert_breakpoint(sym["compute"])
    stop = s.cont(TIMEOUT)
    assert stop is not None and stop.reason is StopReason.SW_BREAKPOINT
    if state == "inside-patch":
        run_to(s, sym["compute"])
        s.insert_breakpoint(sym["compute"])
        assert s.step(0).pc == sym["compute"] + 1
    elif state == "running":
        s.remove_breakpoint(sym["tick"])
        s.remove_breakpoint(sym["compute"])
        s.insert_breakpoint(sym["hh_data"])  # keeps the poller busy, never hit
        s.resume()
    s.detach()
    assert emu.read_phys(page, 0x1000) == before
    assert not emu.paused
    c1 = counter_phys(emu, sym)
    assert wait_until(lambda: counter_phys(emu, sym) > c1)  # not parked: the guest runs on
    assert emu.crash_reason(0) is None


# -- several vCPUs ---------------------------------------------------------------------------
@pytest.mark.parametrize("hide", [PV_LIKE, TRAPS], ids=["no-pause-vcpu", "pause-vcpu"])
def test_two_vcpus(guests: Path, hide: Capability) -> None:
    smp = symbols(guests / "smp.elf")
    dom = EmuDomain(guests / "smp.elf", vcpus=2, start_paused=True)
    ref_dom = EmuDomain(guests / "smp.elf", vcpus=2, start_paused=True)
    s = attach(dom, hide)
    ref = attach(ref_dom, Capability.NONE)
    assert (Capability.PAUSE_VCPU in s.caps) == (hide == TRAPS)

    def counters(sess: Session) -> list[int]:
        return [u64(sess, smp["counters"] + 8 * i) for i in range(2)]

    try:
        s.insert_breakpoint(smp["spin_1"])
        hits = []
        for _ in range(3):
            stop = s.cont(TIMEOUT)
            assert stop is not None and stop.vcpu == 1 and stop.pc == smp["spin_1"], stop
            now = counters(s)
            assert counters(s) == now  # all-stop: vCPU 0 is stopped too
            hits.append(now[1])
        assert hits == [hits[0], hits[0] + 1, hits[0] + 2]
        assert s.remove_breakpoint(smp["spin_1"])

        # Step vCPU 0 through spin_0's end: its `ret` (one byte) sits right before
        # spin_1, which vCPU 1 keeps entering; then back through call *spin_table.
        for sess in (s, ref):
            sess.insert_breakpoint(smp["spin_0"])
            while (stop := sess.cont(TIMEOUT)) is not None and stop.vcpu != 0:
                pass
            assert stop is not None and stop.pc == smp["spin_0"]
            sess.remove_breakpoint(smp["spin_0"])
            sess.step(0)  # movl $64, %ecx
            sess.set_registers(0, {"rcx": 2})  # two more passes of the count-down
        before = counters(s)
        pcs = [s.step(0).pc for _ in range(14)]
        assert pcs == [ref.step(0).pc for _ in range(14)]
        assert smp["spin_0"] + 9 in pcs  # the ret
        assert smp["spin_0"] in pcs[-2:] or smp["spin_0"] in pcs  # called again
        after = counters(s)
        if hide == TRAPS:
            assert after[1] == before[1]  # vCPU 1 was paused
        else:
            # Frozen, co-stepped or stepped aside: a few instructions at most, where
            # running free for 14 steps' time makes it count thousands of passes.
            assert after[1] - before[1] <= 1
        assert after[0] == before[0] + 1  # vCPU 0 went once round the worker loop

        # vCPU 1 is intact: it keeps counting and never crashed.
        s.resume()
        time.sleep(0.1)
        s.interrupt()
        assert s.wait(TIMEOUT) is not None
        assert counters(s)[1] > after[1]
        assert dom.crash_reason(1) is None and dom.crash_reason(0) is None
    finally:
        s.detach()
        ref.detach()
        dom.close()
        ref_dom.close()


@pytest.fixture
def smp_pv(guests: Path) -> Iterator[tuple[Session, dict[str, int]]]:
    """smp.elf on two vCPUs without PAUSE_VCPU, vCPU 0 past its boot code (a stack,
    in worker's loop) and vCPU 1 stopped at spin_1's entry."""
    smp = symbols(guests / "smp.elf")
    dom = EmuDomain(guests / "smp.elf", vcpus=2, start_paused=True)
    s = attach(dom, PV_LIKE)
    for vcpu, where in ((0, "worker"), (1, "spin_1")):
        s.insert_breakpoint(smp[where])
        # (Another vCPU's hit of the previous breakpoint may still be pending.)
        while (stop := s.cont(TIMEOUT)) is not None and (stop.vcpu, stop.pc) != (
            vcpu,
            smp[where],
        ):
            pass
        assert stop is not None
        s.remove_breakpoint(smp[where])
    yield s, smp
    s.detach()
    dom.close()


def call_in_worker(s: Session, smp: dict[str, int]) -> tuple[int, int]:
    """(address, end) of worker's `call *spin_table(, %rbx, 8)`."""
    code = s.read_memory(0, smp["worker"], 0x40)
    for insn in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, smp["worker"]):
        if insn.mnemonic == "call":
            return int(insn.address), int(insn.address + insn.size)
    raise AssertionError("no call in worker")


def test_vcpu_in_the_way_of_a_successor_steps_aside(
    smp_pv: tuple[Session, dict[str, int]],
) -> None:
    s, smp = smp_pv
    # vCPU 0 on spin_0's `jnz 1b` about to fall through to its one-byte `ret`, whose
    # jmp $ would cover spin_1's first byte, where vCPU 1 stands.
    jnz, ret = smp["spin_0"] + 7, smp["spin_0"] + 9
    assert ret + 1 == smp["spin_1"] and instruction_length(s, ret) == 1
    _, back = call_in_worker(s, smp)
    r0 = s.registers(0)
    rsp = r0["rsp"] - 8
    s.write_memory(0, rsp, back.to_bytes(8, "little"))
    s.set_registers(0, {"rip": jnz, "rsp": rsp, "rflags": r0["rflags"] | 0x40})  # ZF: no jump
    stop = s.step(0)
    assert stop.vcpu == 0 and stop.pc == ret
    # vCPU 1 executed its first instruction (movl $128, %ecx) and waited there.
    r1 = s.registers(1)
    assert r1["rip"] == smp["spin_1"] + 5 and r1["rcx"] & 0xFFFFFFFF == 128
    assert s.step(0).pc == back
    assert s.registers(1)["rip"] == smp["spin_1"] + 5  # frozen meanwhile
    assert s.read_memory(0, ret, 2) == bytes.fromhex("c3b9")  # nothing of ours shows


def test_vcpus_on_the_same_instruction_step_together(
    smp_pv: tuple[Session, dict[str, int]],
) -> None:
    s, smp = smp_pv
    call, back = call_in_worker(s, smp)
    # Both vCPUs on the indirect call, each with its own RBX: vCPU 1 leaves spin_1
    # (pop its return address) and goes back to the call; vCPU 0 jumps there.
    for v in (0, 1):
        r = s.registers(v)
        in_spin = smp["spin_0"] <= r["rip"] < smp["spin_0"] + 0x40
        s.set_registers(v, {"rip": call, "rsp": r["rsp"] + (8 if in_spin else 0)})
    counts = [u64(s, smp["counters"] + 8 * i) for i in range(2)]
    stop = s.step(0)
    assert stop.vcpu == 0 and stop.pc == smp["spin_0"]
    # vCPU 1 could not be frozen on the call's bytes: it made the same call, once.
    r1 = s.registers(1)
    assert r1["rip"] == smp["spin_1"]
    assert u64(s, r1["rsp"], vcpu=1) == back
    assert [u64(s, smp["counters"] + 8 * i) for i in range(2)] == counts


# -- front-ends ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["serve", "repl"])
def test_cli_breakpoints_option(command: str) -> None:
    from xendbg.frontend.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([command, "--emu", "g.elf"]).breakpoints == "auto"
    args = parser.parse_args([command, "--emu", "g.elf", "--breakpoints", "spin"])
    assert args.breakpoints == "spin"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--emu", "g.elf", "--breakpoints", "hlt"])


def test_front_ends_pass_the_strategy_to_their_sessions(guests: Path) -> None:
    from rich.console import Console

    from xendbg.frontend.gdbserver.server import DomainServer
    from xendbg.frontend.repl.debugger import Debugger
    from xendbg.frontend.repl.target import EmuTarget

    dbg = Debugger(Console(), target=EmuTarget(str(guests / "longmode.elf")), breakpoints="spin")
    try:
        assert dbg.attach().breakpoints is BreakpointStrategy.SPIN
    finally:
        dbg.close()
    dom = EmuDomain(guests / "longmode.elf", start_paused=True)
    try:
        session = DomainServer(dom, port=0, breakpoints="spin").attach()
        assert session.breakpoints is BreakpointStrategy.SPIN
        session.detach()
    finally:
        dom.close()
