"""The debugger engine (Session) on real Unicorn vCPUs: the semantics every front-end relies on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from elfsyms import symbols
from polling import wait_until
from xendbg.backend.base import Access, Capability
from xendbg.backend.emu import EmuDomain
from xendbg.engine.session import Session
from xendbg.engine.stops import StopReason, WatchKind
from xendbg.errors import GuestMemoryFault, XendbgError

TIMEOUT = 10.0


@pytest.fixture
def sym(guests: Path) -> dict[str, int]:
    return symbols(guests / "longmode.elf")


@pytest.fixture
def dom(guests: Path) -> Iterator[EmuDomain]:
    d = EmuDomain(guests / "longmode.elf", start_paused=True)
    yield d
    d.close()


@pytest.fixture
def session(dom: EmuDomain) -> Iterator[Session]:
    s = Session(dom)
    dom.unpause()  # drop the creation pause: the session holds its own
    yield s
    s.detach()


def run_to(s: Session, addr: int) -> None:
    s.insert_breakpoint(addr)
    stop = s.cont(TIMEOUT)
    assert stop is not None and stop.pc == addr, stop
    s.remove_breakpoint(addr)


def without_debug_registers(s: Session) -> None:
    """Make the session use page-access watchpoints, as on a backend without DRs."""
    assert s.dregs is not None
    s.dregs.clear()
    s.dregs = None


def u64(s: Session, addr: int) -> int:
    return int.from_bytes(s.read_memory(0, addr, 8), "little")


def test_attach_stops_at_first_instruction(session: Session, sym: dict[str, int]) -> None:
    assert session.stop.reason is StopReason.ATTACH
    assert session.pc(0) == sym["_start"]
    assert session.registers(0)["rdi"] == 0


def test_unmapped_breakpoint_uses_debug_register_then_memory_shows_marker(
    session: Session, sym: dict[str, int]
) -> None:
    # main_loop lives in the higher half the guest maps only later.
    with pytest.raises(GuestMemoryFault):
        session.read_memory(0, sym["main_loop"], 1)
    session.insert_breakpoint(sym["main_loop"])
    stop = session.cont(TIMEOUT)
    assert stop is not None
    assert stop.reason is StopReason.SW_BREAKPOINT and stop.pc == sym["main_loop"]
    assert session.read_memory(0, sym["hh_data"], 15) == b"HIGHHALF-MARKER"
    assert session.registers(0)["cr3"] == sym["kernel_pml4"]


def test_int3_is_shadowed_and_stepped_over(session: Session, sym: dict[str, int]) -> None:
    run_to(session, sym["main_loop"])
    tick = sym["tick"]
    original = session.read_memory(0, tick, 4)
    gpa = session.translate(0, tick)
    session.insert_breakpoint(tick)
    assert session.domain.read_phys(gpa, 1) == b"\xcc"  # really planted
    assert session.read_memory(0, tick, 4) == original  # but never shown
    counts = []
    for _ in range(3):
        stop = session.cont(TIMEOUT)
        assert stop is not None and stop.reason is StopReason.SW_BREAKPOINT
        assert stop.pc == tick
        counts.append(u64(session, sym["counter"]))
    assert counts[1] == counts[0] + 1 and counts[2] == counts[1] + 1
    # A write over the breakpoint updates the saved byte and keeps the int3.
    session.write_memory(0, tick, original[:1])
    assert session.domain.read_phys(gpa, 1) == b"\xcc"
    assert session.remove_breakpoint(tick)
    assert session.domain.read_phys(gpa, 4) == original


def test_single_step_walks_instructions(session: Session, sym: dict[str, int]) -> None:
    run_to(session, sym["main_loop"])
    pcs = [session.pc(0)]
    for _ in range(6):
        stop = session.step(0)
        assert stop.reason is StopReason.STEP
        pcs.append(stop.pc)
    assert len(set(pcs)) >= 4  # the loop calls tick/compute: we really moved
    assert sym["tick"] in pcs  # stepped into the call


def test_step_onto_and_off_a_breakpoint(session: Session, sym: dict[str, int]) -> None:
    run_to(session, sym["main_loop"])
    session.insert_breakpoint(sym["tick"])
    stop = session.cont(TIMEOUT)
    assert stop is not None and stop.pc == sym["tick"]
    after = session.step(0)
    assert after.reason is StopReason.STEP and after.pc != sym["tick"]
    assert session.domain.read_phys(session.translate(0, sym["tick"]), 1) == b"\xcc"


def test_hardware_breakpoint_resumes_past_itself(session: Session, sym: dict[str, int]) -> None:
    run_to(session, sym["main_loop"])
    session.insert_breakpoint(sym["compute"], hardware=True)
    first = session.cont(TIMEOUT)
    assert first is not None and first.reason is StopReason.HW_BREAKPOINT
    c1 = u64(session, sym["counter"])
    second = session.cont(TIMEOUT)
    assert second is not None and second.pc == sym["compute"]
    assert u64(session, sym["counter"]) == c1 + 1  # one loop, not a re-trigger
    assert session.remove_breakpoint(sym["compute"], hardware=True)


@pytest.mark.parametrize("force_pages", [False, True])
def test_write_watchpoint_reports_after_the_write(
    session: Session, sym: dict[str, int], force_pages: bool
) -> None:
    run_to(session, sym["main_loop"])
    if force_pages:
        without_debug_registers(session)
        assert Capability.MEM_ACCESS in session.caps
    watched = sym["watched"]
    session.insert_watchpoint(WatchKind.WRITE, watched, 8)
    values = []
    for _ in range(2):
        stop = session.cont(TIMEOUT)
        assert stop is not None and stop.reason is StopReason.WATCHPOINT, stop
        assert stop.watch_kind is WatchKind.WRITE and stop.watch_addr == watched
        values.append(u64(session, watched))
        # The stop comes after the write: the new value is in memory.
        assert values[-1] == u64(session, sym["counter"]) * 3
    assert values[1] == values[0] + 3
    assert session.remove_watchpoint(WatchKind.WRITE, watched, 8)
    if force_pages:
        gfn = session.translate(0, watched) >> 12
        assert session.domain.get_mem_access(gfn) == Access.RWX


def test_page_watch_filters_other_bytes_of_the_page(session: Session, sym: dict[str, int]) -> None:
    run_to(session, sym["main_loop"])
    without_debug_registers(session)
    # `result` shares the page with `watched` and `counter`, written every loop:
    # only `watched` may stop us.
    session.insert_watchpoint(WatchKind.WRITE, sym["watched"], 8)
    stop = session.cont(TIMEOUT)
    assert stop is not None and stop.watch_addr == sym["watched"]


def test_interrupt_from_another_thread(session: Session) -> None:
    import threading

    session.resume()
    t = threading.Timer(0.2, session.interrupt)
    t.start()
    stop = session.wait(TIMEOUT)
    t.join()
    assert stop is not None and stop.reason is StopReason.INTERRUPT
    with pytest.raises(XendbgError):
        session.registers(7)


def test_detach_restores_everything(dom: EmuDomain, sym: dict[str, int]) -> None:
    s = Session(dom)
    dom.unpause()
    run_to(s, sym["main_loop"])
    tick_gpa = s.translate(0, sym["tick"])
    before = dom.read_phys(tick_gpa & ~0xFFF, 0x1000)
    s.insert_breakpoint(sym["tick"])
    s.insert_breakpoint(sym["compute"], hardware=True)
    dregs, s.dregs = s.dregs, None
    s.insert_watchpoint(WatchKind.WRITE, sym["watched"], 8)  # by page rights
    s.dregs = dregs
    watched_gfn = s.translate(0, sym["watched"]) >> 12
    assert dom.get_mem_access(watched_gfn) != Access.RWX
    s.detach()
    assert dom.read_phys(tick_gpa & ~0xFFF, 0x1000) == before
    assert dom.get_mem_access(watched_gfn) == Access.RWX
    assert not dom.paused
    regs_dr7 = []
    dom.pause()
    for v in range(dom.vcpu_count):
        regs_dr7.append(dom.get_registers(v)["dr7"] & 0xFF)
    dom.unpause()
    assert regs_dr7 == [0] * dom.vcpu_count

    def counter() -> int:
        return int.from_bytes(dom.read_phys(sym["counter"] - 0xFFFFFFFF80000000, 8), "little")

    c1 = counter()
    assert wait_until(lambda: counter() > c1)  # the guest runs on


def test_two_vcpus_stop_together(guests: Path) -> None:
    smp_sym = symbols(guests / "smp.elf")
    d = EmuDomain(guests / "smp.elf", vcpus=2, start_paused=True)
    try:
        s = Session(d)
        d.unpause()
        s.insert_breakpoint(smp_sym["spin_1"])
        stop = s.cont(TIMEOUT)
        assert stop is not None and stop.vcpu == 1 and stop.pc == smp_sym["spin_1"]
        c = [
            int.from_bytes(s.read_memory(0, smp_sym["counters"] + 8 * i, 8), "little")
            for i in range(2)
        ]
        again = [
            int.from_bytes(s.read_memory(0, smp_sym["counters"] + 8 * i, 8), "little")
            for i in range(2)
        ]
        assert c == again  # all-stop: vCPU 0 is stopped too
        s.detach()
    finally:
        d.close()
