"""Emulated backend: events with Xen HVM semantics."""

from __future__ import annotations

import select
import struct
from pathlib import Path

import pytest

from emu_guests import DATA, Guest, build_guest
from polling import wait_until
from xendbg.backend.base import Access, Event, EventKind, Response
from xendbg.backend.emu import EmuDomain, VcpuState
from xendbg.errors import BackendError

TIMEOUT = 5.0
DR6_BS = 1 << 14
RF = 1 << 16
TF = 1 << 8


def next_event(d: EmuDomain, kind: EventKind | None = None) -> Event:
    ev = d.poll_event(TIMEOUT)
    assert ev is not None, "no event"
    if kind is not None:
        assert ev.kind is kind, ev
    return ev


def u64(d: EmuDomain, gpa: int) -> int:
    value: int = struct.unpack("<Q", d.read_phys(gpa, 8))[0]
    return value


# A loop with labelled instructions for stepping and breakpoints.
LOOP = """
_start:
  mov $data, %rbx
top:
  incq (%rbx)
step1:
  mov $1, %rax
step2:
  jmp step3
  nop
step3:
  add $2, %rax
target:
  movq %rax, 8(%rbx)
after:
  jmp top
.data
data: .quad 0, 0, 0
"""


@pytest.fixture
def loop(tmp_path: Path) -> tuple[EmuDomain, Guest]:
    g = build_guest(tmp_path, LOOP)
    d = EmuDomain(g.path, start_paused=True)
    yield d, g
    d.close()


def test_int3_event_rewinds_and_resume_after_restoring_byte(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
    # Let the loop run (and get translated) before planting the breakpoint.
    d.unpause()
    d.pause()
    original = d.read_phys(g["target"], 1)
    d.write_phys(g["target"], b"\xcc")
    d.unpause()
    ev = next_event(d, EventKind.SOFTWARE_BREAKPOINT)
    assert ev.rip == g["target"] and ev.insn_length == 1 and ev.vcpu == 0
    assert d.get_registers(0)["rip"] == g["target"]
    assert d.vcpu_state(0) is VcpuState.PAUSED
    # Restore the byte: the stale translated int3 must not run again.
    d.pause()
    d.write_phys(g["target"], original)
    count = u64(d, DATA)
    d.resume(ev)
    d.unpause()
    assert wait_until(lambda: u64(d, DATA) > count + 10)
    assert d.poll_event(0) is None
    assert u64(d, DATA + 8) == 3  # the restored movq ran


def test_event_fd_readable_while_pending(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
    d.write_phys(g["step1"], b"\xcc")
    fd = d.event_fd()
    assert select.select([fd], [], [], 0)[0] == []
    d.unpause()
    assert select.select([fd], [], [], TIMEOUT)[0] == [fd]
    ev = next_event(d)
    assert select.select([fd], [], [], 0)[0] == []
    with pytest.raises(BackendError):
        d.resume(Event(EventKind.SINGLESTEP, 0, 0))
    # A vCPU with an unanswered event stays paused across pause/unpause.
    d.pause()
    d.unpause()
    assert d.poll_event(0.1) is None
    assert d.vcpu_state(0) is VcpuState.PAUSED
    d.resume(ev, Response(reinject=False, registers={"rip": g["step2"]}))
    # The int3 at step1 is still there: the next pass hits it again.
    ev = next_event(d, EventKind.SOFTWARE_BREAKPOINT)
    assert ev.rip == g["step1"] and u64(d, DATA) == 2


def test_singlestep_sequence_with_jump(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.set_singlestep(0, True)
    d.unpause()
    seen = []
    for _ in range(7):
        ev = next_event(d, EventKind.SINGLESTEP)
        assert d.get_registers(0)["rip"] == ev.rip
        seen.append(ev.rip)
        d.resume(ev)
    assert seen == [g["top"], g["step1"], g["step2"], g["step3"], g["target"], g["after"],
                    g["top"]]  # fmt: skip
    ev = next_event(d, EventKind.SINGLESTEP)
    d.resume(ev, Response(singlestep=False))
    assert wait_until(lambda: u64(d, DATA) > 10)
    assert d.poll_event(0) is None


def test_tf_stepping_reports_each_instruction_once(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.monitor(EventKind.DEBUG_EXCEPTION, True)
    d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
    original = d.read_phys(g["step3"], 1)
    d.write_phys(g["step3"], b"\xcc")  # TF steps onto an int3 address
    d.set_registers(0, {"rflags": 0x2 | TF})
    d.unpause()
    got = []
    for _ in range(4):
        ev = next_event(d)
        got.append((ev.kind, ev.rip, ev.dr6))
        if ev.kind is EventKind.SOFTWARE_BREAKPOINT:
            d.write_phys(g["step3"], original)
        d.resume(ev)
    assert got == [
        (EventKind.DEBUG_EXCEPTION, g["top"], DR6_BS),
        (EventKind.DEBUG_EXCEPTION, g["step1"], DR6_BS),
        (EventKind.DEBUG_EXCEPTION, g["step2"], DR6_BS),
        (EventKind.DEBUG_EXCEPTION, g["step3"], DR6_BS),
    ]
    ev = next_event(d)
    assert (ev.kind, ev.rip) == (EventKind.SOFTWARE_BREAKPOINT, g["step3"])
    d.write_phys(g["step3"], original)
    d.resume(ev)
    ev = next_event(d)
    assert (ev.kind, ev.rip, ev.dr6) == (EventKind.DEBUG_EXCEPTION, g["target"], DR6_BS)
    assert d.get_registers(0)["rax"] == 3  # the restored add ran exactly once
    d.resume(ev, Response(registers={"rflags": 0x2}))
    assert d.poll_event(0.1) is None


def test_dr_exec_breakpoint_fault_like_with_rf_resume(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.monitor(EventKind.DEBUG_EXCEPTION, True)
    d.set_registers(0, {"dr0": g["target"], "dr7": 0x401})
    d.unpause()
    ev = next_event(d, EventKind.DEBUG_EXCEPTION)
    assert ev.rip == g["target"] and ev.dr6 == 1
    r = d.get_registers(0)
    assert r["rip"] == g["target"] and r["rflags"] & RF
    assert u64(d, DATA + 8) == 0  # the instruction has not executed
    count = u64(d, DATA)
    d.resume(ev)  # RF set: the instruction runs once, the next pass hits again
    ev = next_event(d, EventKind.DEBUG_EXCEPTION)
    assert ev.rip == g["target"]
    assert u64(d, DATA + 8) == 3 and u64(d, DATA) == count + 1
    # Clearing RF re-triggers on the same instruction without executing it.
    d.resume(ev, Response(registers={"rflags": 0x2}))
    ev = next_event(d, EventKind.DEBUG_EXCEPTION)
    assert ev.rip == g["target"] and u64(d, DATA) == count + 1
    d.resume(ev, Response(registers={"dr7": 0x400}))
    assert d.poll_event(0.1) is None


def test_dr_write_watchpoint_is_trap_like(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.monitor(EventKind.DEBUG_EXCEPTION, True)
    # slot 1, write, 8 bytes: R/W1 = 01, LEN1 = 10
    d.set_registers(0, {"dr1": DATA + 8, "dr7": 0x400 | 1 << 2 | (0b1001 << 20)})
    d.unpause()
    ev = next_event(d, EventKind.DEBUG_EXCEPTION)
    assert ev.dr6 == 1 << 1
    assert ev.rip == g["after"]  # after the movq that wrote
    assert u64(d, DATA + 8) == 3  # the write happened
    count = u64(d, DATA)
    assert count == 1  # reads of data+0 (same page) did not trigger
    d.resume(ev)
    ev = next_event(d, EventKind.DEBUG_EXCEPTION)
    assert ev.rip == g["after"] and u64(d, DATA) == count + 1
    d.resume(ev, Response(registers={"dr7": 0x400}))
    assert d.poll_event(0.1) is None


def test_mem_access_write_event_before_write(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    gfn = DATA >> 12
    d.set_mem_access(gfn, Access.RX)
    assert d.get_mem_access(gfn) == Access.RX
    d.unpause()
    ev = next_event(d, EventKind.MEM_ACCESS)
    assert ev.gpa == DATA and ev.access is Access.W and ev.rip == g["top"]
    assert u64(d, DATA) == 0  # not yet written
    # allow=False: the instruction completes without its write.
    d.resume(ev, Response(allow=False))
    ev = next_event(d, EventKind.MEM_ACCESS)
    assert ev.gpa == DATA + 8 and ev.rip == g["target"]
    assert u64(d, DATA) == 0
    assert d.get_registers(0)["rax"] == 3  # it did get past the incq
    d.resume(ev, Response(allow=True))  # allow=True: the write happens once
    ev = next_event(d, EventKind.MEM_ACCESS)
    assert ev.rip == g["top"] and u64(d, DATA + 8) == 3
    d.set_mem_access(gfn, Access.RWX)
    d.resume(ev)
    assert wait_until(lambda: u64(d, DATA) > 10)


def test_mem_access_exec_and_read(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.set_mem_access(g["top"] >> 12, Access.RW)
    d.unpause()
    ev = next_event(d, EventKind.MEM_ACCESS)
    assert ev.access is Access.X and ev.rip == g["_start"] and ev.gla == g["_start"]
    d.pause()
    d.set_mem_access(g["top"] >> 12, Access.RWX)
    d.set_mem_access(DATA >> 12, Access.NONE)
    d.resume(ev)
    d.unpause()
    ev = next_event(d, EventKind.MEM_ACCESS)
    assert ev.access is Access.R and ev.gpa == DATA and ev.rip == g["top"]
    d.close()
    assert d.get_mem_access(DATA >> 12) == Access.RWX


CR3_GUEST = """
_start:
  mov %cr3, %rax
  mov $0x1000, %rcx
again:
  mov %rax, %cr3
  incq data
  jmp again
.data
data: .quad 0
"""


def test_cr3_write_event_deny_and_allow(tmp_path: Path) -> None:
    g = build_guest(tmp_path, CR3_GUEST)
    with EmuDomain(g.path, start_paused=True) as d:
        cr3 = d.get_registers(0)["cr3"]
        d.monitor(EventKind.WRITE_CTRLREG, True, index=3)
        d.unpause()
        ev = next_event(d, EventKind.WRITE_CTRLREG)
        assert (ev.index, ev.old_value, ev.new_value) == (3, cr3, cr3)
        assert ev.rip == g["again"] and u64(d, DATA) == 0
        d.resume(ev, Response(allow=False))  # dropped: skipped
        ev = next_event(d, EventKind.WRITE_CTRLREG)
        assert u64(d, DATA) == 1
        d.resume(ev, Response(registers={"rax": cr3 + 0x1000 - 0x1000}))
        ev = next_event(d, EventKind.WRITE_CTRLREG)
        assert u64(d, DATA) == 2
        with pytest.raises(BackendError):
            d.monitor(EventKind.WRITE_CTRLREG, True, index=2)
        d.monitor(EventKind.WRITE_CTRLREG, False, index=3)
        d.resume(ev)
        assert wait_until(lambda: u64(d, DATA) > 100)


IDT_GUEST = """
_start:
  lidt idtr
  mov $stack_top, %rsp
  lea handler(%rip), %rax
  mov $idt, %rbx
  mov %ax, 48(%rbx)          # gate 3 offset 15:0
  movw $0x08, 50(%rbx)        # selector
  movw $0x8e00, 52(%rbx)      # present, interrupt gate
  shr $16, %rax
  mov %ax, 54(%rbx)          # offset 31:16
  int3
back:
  movq $2, data+8
  hlt
handler:
  incq data
  iretq
.data
data: .quad 0, 0
idtr: .word 16*4-1
  .quad idt
.balign 16
idt: .fill 64, 1, 0
.balign 16
stack: .fill 256, 1, 0
stack_top:
"""


def test_reinjected_int3_goes_through_guest_idt(tmp_path: Path) -> None:
    g = build_guest(tmp_path, IDT_GUEST)
    with EmuDomain(g.path, start_paused=True) as d:
        d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
        d.unpause()
        ev = next_event(d, EventKind.SOFTWARE_BREAKPOINT)
        assert ev.rip == g["back"] - 1
        d.resume(ev, Response(reinject=True))
        assert d.wait_state(0, VcpuState.HALTED, TIMEOUT)
        assert (u64(d, DATA), u64(d, DATA + 8)) == (1, 2)
        assert d.get_registers(0)["rsp"] == g["stack_top"]


def test_unmonitored_int3_and_inject_trap(tmp_path: Path) -> None:
    g = build_guest(tmp_path, IDT_GUEST)
    with EmuDomain(g.path) as d:
        assert d.wait_state(0, VcpuState.HALTED, TIMEOUT)
        assert (u64(d, DATA), u64(d, DATA + 8)) == (1, 2)
        d.pause()
        d.inject_trap(0, 3)  # wakes the halted vCPU into the handler, iretq to hlt+1
        d.set_registers(0, {"rip": g["back"]})
        d.unpause()
        assert d.wait_state(0, VcpuState.HALTED, TIMEOUT)
        assert u64(d, DATA) == 2


def test_detach_removes_every_hook_and_right(loop: tuple[EmuDomain, Guest]) -> None:
    d, g = loop
    d.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
    d.monitor(EventKind.DEBUG_EXCEPTION, True)
    d.monitor(EventKind.WRITE_CTRLREG, True, index=3)
    d.set_mem_access(DATA >> 12, Access.R)
    d.set_registers(0, {"dr0": g["target"], "dr1": DATA + 16, "dr7": 0x400 | 0b101 | 1 << 20})
    d.unpause()
    ev = next_event(d)  # pending when we detach
    v = d._vcpus[0]
    assert v._prot_hook is not None and v._exec_hooks and v._block_hook is not None
    d.detach()
    assert v._prot_hook is None and not v._exec_hooks and v._block_hook is None
    assert not v._cr_hooks and not v._applied
    assert all(perms == 7 for _, _, perms in v.uc.mem_regions())
    assert d.get_mem_access(DATA >> 12) == Access.RWX
    assert ev is not None and not d.paused
    start = u64(d, DATA)
    assert wait_until(lambda: u64(d, DATA) > start + 1000)
    assert d.vcpu_state(0) is VcpuState.RUNNING
