"""Emulated backend: the synchronous single step and the batched register read."""

from __future__ import annotations

import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu_guests import DATA, build_guest
from polling import wait_until
from xendbg.backend.base import Event, EventKind, Response
from xendbg.backend.emu import EmuDomain, VcpuState
from xendbg.backend.emu.ucext import HAVE_VMEM_READ

TIMEOUT = 5.0
MIB = 1 << 20
UNMAPPED = 0x10_0000_0000  # 64 GiB: beyond the boot tables' 4 GiB identity map

STEPS = """
_start:
  mov $data, %rbx
first:
  nop
second:
  incq (%rbx)
third:
  hlt
after:
  jmp after
.data
data: .quad 0
"""

COUNTERS = """
_start:
  mov $data, %rbx
loop:
  incq (%rbx, %rdi, 8)
  jmp loop
.data
data: .quad 0, 0
"""


def u64s(d: EmuDomain, n: int) -> list[int]:
    return list(struct.unpack(f"<{n}Q", d.read_phys(DATA, 8 * n)))


def queued(d: EmuDomain) -> Event:
    """The next event, which must already be queued (no waiting at all)."""
    assert select.select([d.event_fd()], [], [], 0)[0], "event_fd not readable"
    ev = d.poll_event(0)
    assert ev is not None and ev.kind is EventKind.SINGLESTEP, ev
    return ev


def test_the_step_is_done_when_unpause_and_resume_return(tmp_path: Path) -> None:
    g = build_guest(tmp_path, STEPS)
    with EmuDomain(g.path, start_paused=True) as d:
        d.set_singlestep(0, True)
        d.unpause()
        ev = queued(d)
        assert ev.rip == g["first"] and d.vcpu_state(0) is VcpuState.PAUSED
        rips = [ev.rip]
        for _ in range(3):
            d.resume(ev)
            ev = queued(d)
            rips.append(ev.rip)
        assert rips == [g["first"], g["second"], g["third"], g["after"]]
        assert u64s(d, 1) == [1]
        assert d.get_registers(0)["rip"] == g["after"]
        # The step executed HLT: once single-step is off, the vCPU stays halted.
        d.resume(ev, Response(singlestep=False))
        assert d.wait_state(0, VcpuState.HALTED, TIMEOUT)
        assert d.poll_event(0.05) is None
        assert d.get_registers(0)["rip"] == g["after"]


def test_set_singlestep_on_a_running_vcpu_leaves_the_other_running(tmp_path: Path) -> None:
    with EmuDomain(build_guest(tmp_path, COUNTERS).path, vcpus=2) as d:
        assert wait_until(lambda: min(u64s(d, 2)) > 100)
        d.set_singlestep(1, True)  # not paused: only vCPU 1 is stopped and switched
        ev = d.poll_event(TIMEOUT)
        assert ev is not None and ev.kind is EventKind.SINGLESTEP and ev.vcpu == 1
        start = u64s(d, 2)
        for _ in range(10):  # five passes of the two-instruction loop
            d.resume(ev)
            ev = queued(d)
            assert ev.vcpu == 1
        assert u64s(d, 2)[1] == start[1] + 5
        assert wait_until(lambda: u64s(d, 2)[0] > start[0] + 1000)
        d.resume(ev, Response(singlestep=False))
        assert wait_until(lambda: u64s(d, 2)[1] > start[1] + 1000)
        assert d.poll_event(0) is None


def test_opcode_at_rip_through_the_mmu_and_the_page_walk(tmp_path: Path) -> None:
    g = build_guest(tmp_path, STEPS)
    with EmuDomain(g.path, start_paused=True) as d:
        v = d._vcpus[0]
        expected = {g["first"]: 0x90, g["third"]: 0xF4, g["after"]: 0xEB, UNMAPPED: None}
        assert HAVE_VMEM_READ  # Unicorn >= 2.1.4, as pinned
        assert v._fetch is not None
        for address, opcode in expected.items():
            assert v._fetch.byte(address) == opcode
            assert v._opcode_at(address) == opcode
        v._fetch = None  # older Unicorn: the Python page walk answers the same
        for address, opcode in expected.items():
            assert v._opcode_at(address) == opcode


# -- the batched register read --------------------------------------------------


@pytest.fixture(scope="module", params=[64, 32])
def halted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmuDomain]:
    bits: int = request.param
    g = build_guest(tmp_path_factory.mktemp(f"g{bits}"), "_start:\n  hlt\n", bits=bits)
    d = EmuDomain(g.path, memory=8 * MIB)
    assert d.wait_state(0, VcpuState.HALTED, TIMEOUT)
    yield d
    d.close()


def _writable(word_size: int) -> dict[str, st.SearchStrategy[int]]:
    """Registers any value of which reads back unchanged, by region of the batch."""
    bits = 8 * word_size
    gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
    if word_size == 8:
        gprs += [f"r{i}" for i in range(8, 16)]
    out: dict[str, st.SearchStrategy[int]] = {n: st.integers(0, 2**bits - 1) for n in gprs}
    out["rip"] = st.integers(0, 2**bits - 1)
    for name in ("dr0", "dr1", "dr2", "dr3", "cr2", "gdtr_base", "idtr_base"):
        out[name] = st.integers(0, 2**bits - 1)
    for name in ("fs_base", "gs_base", "kernel_gs_base"):
        out[name] = st.integers(0, 2**47 - 1)
    out["gdtr_limit"] = out["idtr_limit"] = st.integers(0, 0xFFFF)
    for i in range(8):
        out[f"st{i}"] = st.integers(0, 2**80 - 1)
    for i in range(16 if word_size == 8 else 8):
        out[f"xmm{i}"] = st.integers(0, 2**128 - 1)
    out["mxcsr"] = st.sampled_from([0x1F80, 0x1FC0, 0x9FC0, 0x0000])
    return out


@st.composite
def _batches(draw: st.DrawFn, word_size: int) -> list[dict[str, int]]:
    writable = _writable(word_size)
    names = st.lists(st.sampled_from(sorted(writable)), min_size=1, max_size=6, unique=True)
    return [
        {name: draw(writable[name]) for name in draw(names)} for _ in range(draw(st.integers(1, 5)))
    ]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_read_all_follows_every_write(halted: EmuDomain, data: st.DataObject) -> None:
    d = halted
    model = d.get_registers(0)
    for batch in data.draw(_batches(d.word_size)):
        d.set_registers(0, batch)
        model.update(batch)
        # Writing ST(i) retags it (Unicorn derives FTW from the value): ask the
        # single-register path, which does not share the batch's buffer or caches.
        model["ftag"] = d._vcpus[0].regs.read("ftag")
        got = d.get_registers(0)
        assert got == model
        assert list(got) == list(model)  # canonical order kept


def test_st_registers_follow_fstat_top(halted: EmuDomain) -> None:
    d = halted
    phys = [0x3FFF_8000_0000_0000_0000 + i for i in range(8)]
    d.set_registers(0, {"fstat": 0, **{f"st{i}": phys[i] for i in range(8)}})
    before = d.get_registers(0)
    d.set_registers(0, {"fstat": 3 << 11})  # TOP = 3: ST(i) is physical FP(3 + i)
    after = d.get_registers(0)
    assert [after[f"st{i}"] for i in range(8)] == [phys[(3 + i) & 7] for i in range(8)]
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"fstat", *(f"st{i}" for i in range(8))}


def test_single_reads_agree_with_read_all(halted: EmuDomain) -> None:
    d = halted
    d.set_registers(0, {"rax": 0x1234, "cr2": 0xABC000, "fs_base": 0x7000, "mxcsr": 0x1FC0})
    v = d._vcpus[0]
    everything = v.regs.read_all()
    assert everything == d.get_registers(0)
    for name, value in everything.items():
        assert v.regs.read(name) == value, name
    if d.word_size == 4:
        assert all(everything[n] == 0 for n in v.regs.absent)
