"""Emulated backend against the project's test guests (tests/guests, built by make).

The ``guests`` fixture (tests/conftest.py) builds them and fails if the build does.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from elfsyms import symbols
from polling import wait_until
from xendbg.arch.x86.paging import PagingContext, walk
from xendbg.backend.base import Event, EventKind, Response
from xendbg.backend.emu import EmuDomain, VcpuState

TIMEOUT = 5.0
KERNEL_VIRT_BASE = 0xFFFFFFFF80000000


def next_event(d: EmuDomain, kind: EventKind) -> Event:
    ev = d.poll_event(TIMEOUT)
    assert ev is not None and ev.kind is kind, ev
    return ev


def u64s(d: EmuDomain, gpa: int, n: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}Q", d.read_phys(gpa, 8 * n))


def test_longmode_boots_and_counts_per_vcpu(guests: Path) -> None:
    sym = symbols(guests / "longmode.elf")
    counter = sym["counter"] - KERNEL_VIRT_BASE
    with EmuDomain(guests / "longmode.elf", vcpus=2) as d:
        assert wait_until(lambda: min(u64s(d, counter, 2)) > 1000)
        assert d.console_output().startswith(
            b"xendbg test guest: vcpu 0 up\nhh_data: HIGHHALF-MARKER\n"
        )
        d.pause_vcpu(1)
        frozen = u64s(d, counter, 2)[1]
        assert wait_until(lambda: u64s(d, counter, 2)[0] > u64s(d, counter, 2)[1] + 1000)
        assert u64s(d, counter, 2)[1] == frozen
        r = d.get_registers(1)
        assert r["rbx"] == 1 and r["rip"] >= KERNEL_VIRT_BASE
        assert r["cr3"] == sym["kernel_pml4"]
        # The guest's own tables map its higher half: check with the page walker.
        ctx = PagingContext(r["cr0"], r["cr3"], r["cr4"], r["efer"])
        assert walk(d.read_phys, ctx, sym["counter"]).gpa == counter
        assert walk(d.read_phys, ctx, sym["hh_data"]).gpa == sym["hh_data_phys"]


def test_longmode_breakpoint_on_higher_half_tick(guests: Path) -> None:
    sym = symbols(guests / "longmode.elf")
    tick_phys = sym["tick"] - KERNEL_VIRT_BASE
    with EmuDomain(guests / "longmode.elf", vcpus=2) as d:
        d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
        assert wait_until(lambda: b"HIGHHALF" in d.console_output())
        d.pause()
        original = d.read_phys(tick_phys, 1)
        d.write_phys(tick_phys, b"\xcc")
        d.unpause()
        # Each vCPU stops on its own: the first one's event stays unanswered
        # (it stays paused) while the other one runs into the breakpoint too.
        pending = {}
        for _ in range(2):
            ev = next_event(d, EventKind.SOFTWARE_BREAKPOINT)
            assert ev.rip == sym["tick"] and ev.vcpu not in pending
            regs = d.get_registers(ev.vcpu)
            assert regs["rip"] == sym["tick"] and regs["rdi"] == ev.vcpu
            pending[ev.vcpu] = ev
        assert set(pending) == {0, 1}
        d.pause()
        d.write_phys(tick_phys, original)
        for ev in pending.values():
            d.resume(ev)
        assert d.poll_event(0) is None
        d.unpause()
        counter = sym["counter"] - KERNEL_VIRT_BASE
        start = u64s(d, counter, 2)

        def advanced() -> bool:
            return all(x > y + 100 for x, y in zip(u64s(d, counter, 2), start, strict=True))

        assert wait_until(advanced)


def test_longmode_watchpoint_through_guest_page_tables(guests: Path) -> None:
    sym = symbols(guests / "longmode.elf")
    with EmuDomain(guests / "longmode.elf") as d:
        d.monitor(EventKind.DEBUG_EXCEPTION, True)
        assert wait_until(lambda: b"HIGHHALF" in d.console_output())
        d.pause()
        # DR0 = watched[0] (a higher-half linear address), write, 8 bytes.
        d.set_registers(0, {"dr0": sym["watched"], "dr7": 0x400 | 1 | (0b1001 << 16)})
        d.unpause()
        ev = next_event(d, EventKind.DEBUG_EXCEPTION)
        assert ev.dr6 == 1
        counter = u64s(d, sym["counter"] - KERNEL_VIRT_BASE, 1)[0]
        watched = u64s(d, sym["watched"] - KERNEL_VIRT_BASE, 1)[0]
        assert watched == counter * 3  # trap-like: the write is done
        loop_size = symbols(guests / "longmode.elf", "st_size")["main_loop"]
        assert sym["main_loop"] < ev.rip < sym["main_loop"] + loop_size
        assert d.get_registers(0)["rip"] == ev.rip
        d.resume(ev, Response(registers={"dr7": 0x400}))


def test_longmode_cr3_write_event_at_boot(guests: Path) -> None:
    sym = symbols(guests / "longmode.elf")
    with EmuDomain(guests / "longmode.elf", start_paused=True) as d:
        boot_cr3 = d.get_registers(0)["cr3"]
        d.monitor(EventKind.WRITE_CTRLREG, True, index=3)
        d.unpause()
        ev = next_event(d, EventKind.WRITE_CTRLREG)
        assert ev.index == 3 and ev.old_value == boot_cr3
        assert ev.new_value == sym["kernel_pml4"]
        d.monitor(EventKind.WRITE_CTRLREG, False, index=3)
        d.resume(ev)
        assert wait_until(lambda: b"HIGHHALF" in d.console_output())
        d.pause()
        assert d.get_registers(0)["cr3"] == sym["kernel_pml4"]


def test_smp_guest_counters_and_singlestep_one_vcpu(guests: Path) -> None:
    sym = symbols(guests / "smp.elf")
    with EmuDomain(guests / "smp.elf", vcpus=2) as d:
        assert wait_until(lambda: min(u64s(d, sym["counters"], 2)) > 10)
        d.pause()
        d.set_singlestep(1, True)
        d.unpause()
        rips = []
        for _ in range(5):
            ev = next_event(d, EventKind.SINGLESTEP)
            assert ev.vcpu == 1
            rips.append(ev.rip)
            d.resume(ev)
        assert all(sym["worker"] <= rip < sym["stacks"] for rip in rips)
        before = u64s(d, sym["counters"], 2)[0]
        assert wait_until(lambda: u64s(d, sym["counters"], 2)[0] > before + 10)
        ev = next_event(d, EventKind.SINGLESTEP)
        d.resume(ev, Response(singlestep=False))


@pytest.mark.parametrize("image", ["i386.elf", "pae.elf"])
def test_32bit_guests_boot_and_break(guests: Path, image: str) -> None:
    sym = symbols(guests / image)
    with EmuDomain(guests / image) as d:
        assert d.word_size == 4
        assert wait_until(lambda: b"HIGHHALF-MARKER" in d.console_output())
        assert wait_until(lambda: struct.unpack("<I", d.read_phys(sym["counter"], 4))[0] > 100)
        d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
        d.pause()
        original = d.read_phys(sym["tick"], 1)
        d.write_phys(sym["tick"], b"\xcc")
        d.unpause()
        ev = next_event(d, EventKind.SOFTWARE_BREAKPOINT)
        r = d.get_registers(0)
        assert ev.rip == r["rip"] == sym["tick"]
        assert r["cr0"] & 0x80000000 and r["r8"] == 0
        d.write_phys(sym["tick"], original)
        d.resume(ev)
        assert d.vcpu_state(0) is VcpuState.RUNNING
