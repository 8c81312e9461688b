"""Emulated backend: vCPU threads, pausing, console, halt/crash, close."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from emu_guests import DATA, TEXT, build_guest
from polling import wait_until
from xendbg.backend.emu import EmuDomain, VcpuState
from xendbg.errors import BackendError, DomainGone

COUNTERS = """
_start:
  mov $data, %rbx
loop:
  incq (%rbx, %rdi, 8)
  jmp loop
.data
data: .quad 0, 0, 0, 0
"""


def counters(d: EmuDomain, n: int = 2) -> list[int]:
    return list(struct.unpack(f"<{n}Q", d.read_phys(DATA, 8 * n)))


@pytest.fixture
def smp(tmp_path: Path) -> EmuDomain:
    d = EmuDomain(build_guest(tmp_path, COUNTERS).path, vcpus=2)
    yield d
    d.close()


def test_each_vcpu_runs_with_its_index(smp: EmuDomain) -> None:
    assert wait_until(lambda: all(c > 1000 for c in counters(smp)))


def test_shared_memory_between_vcpus(tmp_path: Path) -> None:
    src = """
_start:
  mov $data, %rbx
  test %rdi, %rdi
  jnz reader
  movq $0x5A5A, 8(%rbx)
  hlt
reader:
  cmpq $0x5A5A, 8(%rbx)
  jne reader
  movq $1, 16(%rbx)
  hlt
.data
data: .quad 0, 0, 0
"""
    with EmuDomain(build_guest(tmp_path, src).path, vcpus=2) as d:
        assert d.wait_state(1, VcpuState.HALTED, 5)
        assert counters(d, 3) == [0, 0x5A5A, 1]


def test_pause_is_synchronous_and_nests(smp: EmuDomain) -> None:
    d = smp
    assert wait_until(lambda: counters(d)[0] > 0)
    d.pause()
    d.pause()
    assert d.paused
    frozen = counters(d)
    time.sleep(0.05)
    assert counters(d) == frozen
    assert d.vcpu_state(0) is VcpuState.PAUSED
    d.unpause()
    time.sleep(0.02)
    assert counters(d) == frozen  # still paused once
    d.unpause()
    assert not d.paused
    assert wait_until(lambda: all(a > b for a, b in zip(counters(d), frozen, strict=True)))
    with pytest.raises(BackendError):
        d.unpause()


def test_pause_one_vcpu_while_the_other_runs(smp: EmuDomain) -> None:
    d = smp
    d.pause_vcpu(1)
    assert d.vcpu_state(1) is VcpuState.PAUSED and d.vcpu_state(0) is VcpuState.RUNNING
    stuck = counters(d)[1]
    first = counters(d)[0]
    assert wait_until(lambda: counters(d)[0] > first + 1000)
    assert counters(d)[1] == stuck
    assert d.get_registers(1)["rdi"] == 1  # a paused vCPU's registers are readable
    d.unpause_vcpu(1)
    assert wait_until(lambda: counters(d)[1] > stuck)
    with pytest.raises(BackendError):
        d.unpause_vcpu(1)


def test_start_paused(tmp_path: Path) -> None:
    with EmuDomain(build_guest(tmp_path, COUNTERS).path, start_paused=True) as d:
        time.sleep(0.02)
        assert d.paused and counters(d, 1) == [0]
        assert d.get_registers(0)["rip"] == TEXT
        d.unpause()
        assert wait_until(lambda: counters(d, 1)[0] > 0)


def test_console_port_e9(tmp_path: Path) -> None:
    src = """
_start:
  lea msg(%rip), %rsi
  mov $6, %ecx
  mov $0xe9, %dx
  rep outsb
  mov $0x21, %al
  out %al, $0x80
  out %al, $0xe9
  hlt
msg: .ascii "hello\\n"
"""
    seen: list[bytes] = []
    with EmuDomain(build_guest(tmp_path, src).path, on_console=seen.append) as d:
        assert d.wait_state(0, VcpuState.HALTED, 5)
        assert d.console_output() == b"hello\n!"
        assert b"".join(seen) == b"hello\n!"


def test_crash_is_recorded_not_raised(tmp_path: Path) -> None:
    src = (
        "_start:\n  test %rdi, %rdi\n  jnz ok\n  ud2\n"
        "ok:\n  mov $0x7fff0000000, %rax\n  jmp *%rax\n"  # fetch outside RAM
    )
    with EmuDomain(build_guest(tmp_path, src).path, vcpus=2) as d:
        assert d.wait_state(0, VcpuState.CRASHED, 5)
        assert d.wait_state(1, VcpuState.CRASHED, 5)
        assert "Invalid instruction" in (d.crash_reason(0) or "")
        assert d.crash_reason(1)
        assert d.get_registers(0)["rip"] == TEXT + 5  # on the ud2


def test_int3_without_monitoring_and_without_idt_is_a_triple_fault(tmp_path: Path) -> None:
    with EmuDomain(build_guest(tmp_path, "_start:\n  int3\n  hlt\n").path) as d:
        assert d.wait_state(0, VcpuState.CRASHED, 5)
        assert "triple fault" in (d.crash_reason(0) or "")


def test_detach_leaves_guest_running_close_stops_it(smp: EmuDomain) -> None:
    d = smp
    d.pause()
    d.detach()
    assert not d.paused
    start = counters(d)
    assert wait_until(lambda: all(a > b for a, b in zip(counters(d), start, strict=True)))
    with pytest.raises(DomainGone):
        d.pause()
    d.close()
    d.close()  # idempotent
    with pytest.raises(DomainGone):
        d.read_phys(DATA, 8)
    assert all(not v.thread.is_alive() for v in d._vcpus)


# Page tables mapping nothing but the code page: linear 0 and every other page
# are unmapped, the case where emu_start(until=...) could fault translating
# ``until``.  The backend disables ``until`` (UC_CTL_UC_USE_EXITS, no exits),
# so many stop/start cycles run the guest to its exact end.
SPARSE = """
_start:
  mov $pml4, %rax
  mov %rax, %cr3
  lea counter(%rip), %rbx
loop:
  incq (%rbx)
  cmpq $1000000, (%rbx)
  jne loop
  hlt
counter: .quad 0
.data
.balign 4096
pml4: .quad pdpt + 3
  .fill 511, 8, 0
pdpt: .quad pd + 3
  .fill 511, 8, 0
pd: .quad pt + 3
  .fill 511, 8, 0
pt: .fill 256, 8, 0
  .quad 0x100000 + 3
  .fill 255, 8, 0
"""


def test_stop_start_cycles_with_sparse_page_tables(tmp_path: Path) -> None:
    g = build_guest(tmp_path, SPARSE)
    with EmuDomain(g.path) as d:
        cycles = 0
        while d.vcpu_state(0) is VcpuState.RUNNING and cycles < 2000:
            d.pause()
            d.unpause()
            cycles += 1
        assert d.wait_state(0, VcpuState.HALTED, 10), d.crash_reason(0)
        assert cycles > 10
        assert d.read_phys(g["counter"], 8) == struct.pack("<Q", 1000000)
