"""XenDomain's glue (events, responses, memory, registers, close) against a fake Xen.

Real Xen cannot run here, so the library handles are replaced by fakes named as
such (FakeXenCtrl …) through ``XenLibraries``; the fake hypervisor produces
requests with vm_event.FrontRing on the same page XenDomain consumes, exactly
as Xen's vm_event.c does.  The lab (make lab-test) runs the real thing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from xendbg.backend.base import Access, Capability, EventKind, GuestType, Response
from xendbg.backend.xen import context, structs, vm_event
from xendbg.backend.xen.domain import XenDomain, XenLibraries
from xendbg.backend.xen.xenforeignmemory import ForeignMapping
from xendbg.errors import BackendError, DomainBusy, GuestMemoryFault, Unsupported, XendbgError

DOMID = 7
PAGES = 16  # guest RAM of the fake domain
VERSION = 7


class FakeXenCtrl:
    """libxenctrl as far as XenDomain uses it, over Python state."""

    def __init__(self, hvm: bool = True, caps: int = 0x1F7B, busy: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.hvm, self.caps, self.busy = hvm, caps, busy
        self.ring = (ctypes.c_char * structs.PAGE_SIZE)()
        self.front: vm_event.FrontRing | None = None
        self.cpus = [structs.hvm_hw_cpu() for _ in range(2)]
        for i, cpu in enumerate(self.cpus):
            cpu.rip, cpu.rsp, cpu.msr_efer, cpu.dr6 = 0x1000 + i, 0x8000, 0xD01, 0xFFFF4FF0
        self.pv = structs.vcpu_guest_context_any()
        self.pause_count = 0
        self.access: dict[int, int] = {}

    def _log(self, *call: Any) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def close(self) -> None:
        self._log("xc_interface_close")

    def version(self) -> tuple[int, int]:
        return (4, 17)

    def vm_event_version(self) -> int:
        return VERSION

    def domain_info_from(self, first: int, version: tuple[int, int]) -> Any:
        if first > DOMID:
            return None
        info = structs.domaininfo_type(version)()
        info.domain = DOMID
        info.flags = structs.XEN_DOMINF_hvm_guest if self.hvm else 0
        info.arch_config.emulation_flags = structs.XEN_X86_EMU_LAPIC
        info.max_vcpu_id = 1
        return info

    def guest_width(self, domid: int) -> int:
        return 8

    def domain_pause(self, domid: int) -> None:
        self.pause_count += 1
        self._log("xc_domain_pause")

    def domain_unpause(self, domid: int) -> None:
        self.pause_count -= 1
        self._log("xc_domain_unpause")

    def hvm_getcontext_partial(self, domid: int, code: int, vcpu: int, size: int) -> bytes:
        if not self.hvm:
            raise BackendError("xc_domain_hvm_getcontext_partial", errno.EINVAL)
        return bytes(self.cpus[vcpu])

    def hvm_getcontext(self, domid: int) -> bytearray:
        blob = struct.pack("<HHI", 1, 0, 24) + bytes(24)
        for i, cpu in enumerate(self.cpus):
            blob += struct.pack("<HHI", 2, i, ctypes.sizeof(cpu)) + bytes(cpu)
        return bytearray(blob + struct.pack("<HHI", 0, 0, 0))

    def hvm_setcontext(self, domid: int, blob: bytes | bytearray) -> None:
        assert self.pause_count > 0, "the context round trip must run with the domain paused"
        for i in range(len(self.cpus)):
            off = context.cpu_record_offset(blob, i)
            self.cpus[i] = structs.hvm_hw_cpu.from_buffer_copy(blob, off)
        self._log("xc_domain_hvm_setcontext")

    def vcpu_getcontext(self, domid: int, vcpu: int) -> structs.vcpu_guest_context_any:
        return structs.vcpu_guest_context_any.from_buffer_copy(bytes(self.pv))

    def vcpu_setcontext(self, domid: int, vcpu: int, ctxt: structs.vcpu_guest_context_any) -> None:
        self.pv = ctxt
        self._log("xc_vcpu_setcontext", vcpu)

    def monitor_enable(self, domid: int) -> tuple[int, int]:
        if self.busy:
            raise BackendError("xc_monitor_enable", errno.EBUSY)
        self._log("xc_monitor_enable")
        return ctypes.addressof(self.ring), 42

    def attach_front(self) -> vm_event.FrontRing:
        # Xen's side of the page XenDomain initialised (same indices, no re-init).
        self.front = vm_event.FrontRing(memoryview(self.ring).cast("B"), VERSION, init=False)
        return self.front

    def unmap_ring(self, addr: int) -> None:
        self._log("munmap")

    def monitor_disable(self, domid: int) -> None:
        self._log("xc_monitor_disable")

    def monitor_capabilities(self, domid: int) -> int:
        return self.caps

    def get_mem_access(self, domid: int, pfn: int) -> int:
        if self.caps & (1 << 31):  # this fake's switch for an Intel EPT host
            return self.access.get(pfn, 7)
        raise BackendError("xc_get_mem_access", errno.EINVAL)

    def set_mem_access(self, domid: int, access: int, pfn: int, nr: int = 1) -> None:
        self.access[pfn] = access
        self._log("xc_set_mem_access", pfn, access)

    def debug_control(self, domid: int, op: int, vcpu: int) -> None:
        self._log("xc_domain_debug_control", op, vcpu)

    def monitor_software_breakpoint(self, domid: int, enable: bool) -> None:
        self._log("xc_monitor_software_breakpoint", enable)

    def monitor_debug_exceptions(self, domid: int, enable: bool, *, sync: bool = True) -> None:
        self._log("xc_monitor_debug_exceptions", enable, sync)

    def monitor_singlestep(self, domid: int, enable: bool) -> None:
        raise BackendError("xc_monitor_singlestep", errno.EOPNOTSUPP)

    def monitor_write_ctrlreg(self, domid: int, index: int, enable: bool) -> None:
        self._log("xc_monitor_write_ctrlreg", index, enable)

    def monitor_mov_to_msr(self, domid: int, msr: int, enable: bool) -> None:
        self._log("xc_monitor_mov_to_msr", msr, enable)

    def monitor_cpuid(self, domid: int, enable: bool) -> None:
        self._log("xc_monitor_cpuid", enable)


class FakeEventChannel:
    """xenevtchn over a pipe: the fake hypervisor writes a byte to notify us."""

    def __init__(self, xc: FakeXenCtrl) -> None:
        self.xc = xc
        self.r, self.w = os.pipe()

    def fd(self) -> int:
        return self.r

    def bind_interdomain(self, domid: int, remote: int) -> int:
        assert remote == 42
        self.xc._log("xenevtchn_bind_interdomain")
        return 5

    def raise_event(self) -> None:
        os.write(self.w, b"x")

    def pending(self) -> int:
        os.read(self.r, 1)
        return 5

    def unmask(self, port: int) -> None:
        self.xc._log("xenevtchn_unmask", port)

    def notify(self, port: int) -> None:
        self.xc._log("xenevtchn_notify", port)

    def unbind(self, port: int) -> None:
        self.xc._log("xenevtchn_unbind", port)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)
        self.xc._log("xenevtchn_close")


class FakeForeignMemory:
    """xenforeignmemory over a bytearray of PAGES frames; frame 3 is a hole."""

    def __init__(self, ram: bytearray) -> None:
        self.ram = ram
        self.live: dict[int, tuple[Any, list[int]]] = {}

    def map(self, domid: int, prot: int, frames: list[int]) -> ForeignMapping:
        buf = (ctypes.c_char * (len(frames) * structs.PAGE_SIZE))()
        errors = []
        for i, f in enumerate(frames):
            ok = f < PAGES and f != 3
            errors.append(0 if ok else errno.EFAULT)
            if ok:
                ctypes.memmove(
                    ctypes.addressof(buf) + i * 4096, bytes(self.ram[f * 4096 :][:4096]), 4096
                )
        self.live[ctypes.addressof(buf)] = (buf, list(frames))
        return ForeignMapping(self, ctypes.addressof(buf), errors)  # type: ignore[arg-type]

    def unmap(self, addr: int, pages: int) -> None:
        buf, frames = self.live.pop(addr)
        for i, f in enumerate(frames):
            if f < PAGES and f != 3:
                self.ram[f * 4096 : (f + 1) * 4096] = bytes(buf)[i * 4096 : (i + 1) * 4096]

    def close(self) -> None:
        assert not self.live, "every mapping is unmapped"


class FakeDeviceModel:
    def __init__(self, xc: FakeXenCtrl) -> None:
        self.xc = xc

    def inject_event(
        self,
        domid: int,
        vcpu: int,
        vector: int,
        event_type: int,
        error_code: int = 0xFFFFFFFF,
        insn_len: int = 0,
        extra: int = 0,
    ) -> None:
        call = (vcpu, vector, event_type, error_code, insn_len, extra)
        self.xc._log("xendevicemodel_inject_event", *call)

    def close(self) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[tuple[XenDomain, FakeXenCtrl, FakeEventChannel, bytearray]]:
    yield from make()


def make(**kw: Any) -> Iterator[tuple[XenDomain, FakeXenCtrl, FakeEventChannel, bytearray]]:
    xc = FakeXenCtrl(**kw)
    ev = FakeEventChannel(xc)
    ram = bytearray(os.urandom(PAGES * structs.PAGE_SIZE))

    def no_xenstore() -> Any:
        raise XendbgError("no xenstored in this test")

    libs = XenLibraries(
        xenctrl=lambda: xc,  # type: ignore[arg-type,return-value]
        xenstore=no_xenstore,
        foreignmemory=lambda _log: FakeForeignMemory(ram),  # type: ignore[arg-type,return-value]
        evtchn=lambda _log: ev,  # type: ignore[arg-type,return-value]
        devicemodel=lambda _log: FakeDeviceModel(xc),  # type: ignore[arg-type,return-value]
    )
    dom = XenDomain(DOMID, libs=libs)
    if dom.guest_type is not GuestType.PV:
        xc.attach_front()
    yield dom, xc, ev, ram
    dom.close()


def xen_sends(xc: FakeXenCtrl, ev: FakeEventChannel, reason: int, vcpu: int, **f: int) -> None:
    assert xc.front is not None
    flags = vm_event.VM_EVENT_FLAG_VCPU_PAUSED
    xc.front.put_request(vm_event.encode_request(VERSION, reason, vcpu, flags, **f))
    xc.front.push_requests()
    ev.raise_event()


def xen_takes_response(xc: FakeXenCtrl) -> Any:
    assert xc.front is not None and xc.front.unconsumed_responses() == 1
    return vm_event.Request(xc.front.get_response(), VERSION).st


# -- attach -------------------------------------------------------------------------------


def test_attach_reads_type_width_and_capabilities(fake: Any) -> None:
    dom, xc, _, _ = fake
    assert (dom.guest_type, dom.word_size, dom.vcpu_count, dom.name) == (GuestType.PVH, 8, 2, "")
    assert Capability.SOFTWARE_BREAKPOINT in dom.capabilities
    assert Capability.DEBUG_EXCEPTION | Capability.INJECT_TRAP in dom.capabilities
    assert Capability.SINGLESTEP not in dom.capabilities  # 0x1f7b: no MTF under SVM
    assert Capability.MEM_ACCESS not in dom.capabilities
    with pytest.raises(Unsupported, match="Intel VMX with EPT"):
        dom.set_mem_access(5, Access.R)
    assert xc.names()[:2] == ["xc_monitor_enable", "xenevtchn_bind_interdomain"]
    assert bytes(xc.ring)[:16] == struct.pack("<IIII", 0, 1, 0, 1)  # SHARED_RING_INIT


def test_attach_to_a_monitored_domain_is_busy() -> None:
    with pytest.raises(DomainBusy, match="already has a vm_event monitor"):
        next(make(busy=True))


# -- memory -------------------------------------------------------------------------------


def test_read_and_write_physical_memory(fake: Any) -> None:
    dom, _, _, ram = fake
    assert dom.read_phys(0x1FF8, 16) == bytes(ram[0x1FF8:0x2008])  # across a page boundary
    dom.write_phys(0x4FFE, b"\xcc\xcc\x90\x90")
    assert ram[0x4FFE:0x5002] == b"\xcc\xcc\x90\x90"
    assert dom.read_phys(0, 0) == b""


def test_a_missing_page_faults_at_its_address_and_nothing_is_written(fake: Any) -> None:
    dom, _, _, ram = fake
    with pytest.raises(GuestMemoryFault) as info:
        dom.read_phys(0x2F00, 0x200)
    assert info.value.addr == 0x3000
    with pytest.raises(GuestMemoryFault) as info:
        dom.read_phys(0x3010, 4)
    assert info.value.addr == 0x3010
    before = bytes(ram)
    with pytest.raises(GuestMemoryFault):
        dom.write_phys(0x2FF0, bytes(0x20))
    assert bytes(ram) == before
    with pytest.raises(GuestMemoryFault) as info:
        dom.read_phys(PAGES * 4096 - 2, 4)
    assert info.value.addr == PAGES * 4096


# -- registers ----------------------------------------------------------------------------


def test_registers_round_trip_through_the_whole_context(fake: Any) -> None:
    dom, xc, _, _ = fake
    assert dom.get_registers(1)["rip"] == 0x1001
    dom.set_registers(1, {"rip": 0x2222, "dr7": 0x401, "xmm0": 5})
    assert (xc.cpus[1].rip, xc.cpus[1].dr7, xc.cpus[0].rip) == (0x2222, 0x401, 0x1000)
    assert dom.get_registers(1)["xmm0"] == 5
    assert xc.pause_count == 0  # the round trip's own pause was dropped
    with pytest.raises(XendbgError, match="cr8"):
        dom.set_registers(0, {"cr8": 1})
    with pytest.raises(XendbgError, match="no vCPU 2"):
        dom.get_registers(2)


def test_pause_nesting(fake: Any) -> None:
    dom, xc, _, _ = fake
    dom.pause()
    dom.pause()
    assert dom.paused and xc.pause_count == 2
    dom.unpause()
    assert dom.paused
    dom.unpause()
    assert not dom.paused and xc.pause_count == 0
    with pytest.raises(BackendError, match="not paused by us"):
        dom.unpause()


# -- events ---------------------------------------------------------------------------------


def test_breakpoint_event_and_plain_resume(fake: Any) -> None:
    dom, xc, ev, _ = fake
    dom.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
    assert dom.poll_event(0) is None
    xen_sends(xc, ev, vm_event.VM_EVENT_REASON_SOFTWARE_BREAKPOINT, 1,
              u__software_breakpoint__insn_length=1, data__regs__x86__rip=0x1234)  # fmt: skip
    event = dom.poll_event(1.0)
    assert event is not None
    assert (event.kind, event.vcpu, event.rip, event.insn_length) == (
        EventKind.SOFTWARE_BREAKPOINT, 1, 0x1234, 1)  # fmt: skip
    assert ("xenevtchn_unmask", 5) in xc.calls
    dom.resume(event)
    rsp = xen_takes_response(xc)
    assert (rsp.vcpu_id, rsp.flags) == (1, vm_event.VM_EVENT_FLAG_VCPU_PAUSED)
    assert xc.calls[-1] == ("xenevtchn_notify", 5)
    with pytest.raises(XendbgError, match="no pending event"):
        dom.resume(event)


def test_reinjected_breakpoint_and_registers_in_the_response(fake: Any) -> None:
    dom, xc, ev, _ = fake
    xen_sends(xc, ev, vm_event.VM_EVENT_REASON_SOFTWARE_BREAKPOINT, 0,
              u__software_breakpoint__insn_length=1, u__software_breakpoint__type=6,
              data__regs__x86__rip=0x1000)  # fmt: skip
    event = dom.poll_event(1.0)
    assert event is not None
    dom.resume(event, Response(reinject=True, registers={"rax": 9, "cr3": 0x5000}))
    assert ("xendevicemodel_inject_event", 0, 3, 6, 0xFFFFFFFF, 1, 0) in xc.calls
    assert xc.cpus[0].cr3 == 0x5000  # not in SET_REGISTERS' reach: set through the context
    rsp = xen_takes_response(xc)
    assert rsp.flags == vm_event.VM_EVENT_FLAG_VCPU_PAUSED | vm_event.VM_EVENT_FLAG_SET_REGISTERS
    assert (rsp.data.regs.x86.rax, rsp.data.regs.x86.rip) == (9, 0x1000)


def test_debug_exception_dr6_comes_from_the_vcpu_when_the_event_has_none(fake: Any) -> None:
    dom, xc, ev, _ = fake
    dom.monitor(EventKind.DEBUG_EXCEPTION, True)
    assert ("xc_monitor_debug_exceptions", True, True) in xc.calls
    xen_sends(xc, ev, vm_event.VM_EVENT_REASON_DEBUG_EXCEPTION, 0, u__debug_exception__type=3)
    event = dom.poll_event(1.0)
    assert event is not None and event.dr6 == 0xFFFF4FF0  # BS, from hvm_hw_cpu.dr6
    dom.resume(event, Response(reinject=True))
    assert ("xendevicemodel_inject_event", 0, 1, 3, 0xFFFFFFFF, 0, 0xFFFF4FF0) in xc.calls


def test_debug_exception_without_status_bits_is_inferred_from_tf(fake: Any) -> None:
    # What the lab's emulated SVM does: DR6 stays 0xffff0ff0 for a TF step.
    dom, xc, ev, _ = fake
    xc.cpus[0].dr6, xc.cpus[0].rflags = 0xFFFF0FF0, 0x102
    xen_sends(xc, ev, vm_event.VM_EVENT_REASON_DEBUG_EXCEPTION, 0, data__regs__x86__dr6=0xFFFF0FF0)
    event = dom.poll_event(1.0)
    assert event is not None and event.dr6 == 0xFFFF4FF0


def test_foreign_reasons_are_answered_without_surfacing(fake: Any) -> None:
    dom, xc, ev, _ = fake
    xen_sends(xc, ev, vm_event.VM_EVENT_REASON_GUEST_REQUEST, 1)
    assert dom.poll_event(0.05) is None
    assert xen_takes_response(xc).reason == vm_event.VM_EVENT_REASON_GUEST_REQUEST


def test_unsupported_monitors(fake: Any) -> None:
    dom, xc, _, _ = fake
    with pytest.raises(Unsupported):
        dom.monitor(EventKind.SINGLESTEP, True)  # not in the capability bitmap
    with pytest.raises(Unsupported):
        dom.set_singlestep(0, True)
    dom.monitor(EventKind.WRITE_CTRLREG, True, index=3)
    assert ("xc_monitor_write_ctrlreg", vm_event.VM_EVENT_X86_CR3, True) in xc.calls
    with pytest.raises(XendbgError, match="CR0, CR3 or CR4"):
        dom.monitor(EventKind.WRITE_CTRLREG, True, index=2)


def test_close_undoes_everything_in_order() -> None:
    gen = make(caps=0x1F7B | (1 << 31))
    dom, xc, ev, _ = next(gen)
    assert Capability.MEM_ACCESS in dom.capabilities
    dom.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
    dom.set_mem_access(9, Access.RX)
    dom.pause()
    xen_sends(xc, ev, vm_event.VM_EVENT_REASON_SOFTWARE_BREAKPOINT, 0)
    assert dom.poll_event(1.0) is not None  # left unanswered
    xen_sends(xc, ev, vm_event.VM_EVENT_REASON_SOFTWARE_BREAKPOINT, 1)  # never even polled
    start = len(xc.calls)
    dom.close()
    names = [c[0] for c in xc.calls[start:]]
    assert names.index("xc_monitor_software_breakpoint") < names.index("xenevtchn_notify")
    assert ("xc_set_mem_access", 9, 7) in xc.calls[start:]  # the original rights back
    assert xc.front is not None and xc.front.unconsumed_responses() == 2  # both vCPUs freed
    assert xc.pause_count == 0
    tail = [n for n in names if n in ("xenevtchn_unbind", "munmap", "xc_monitor_disable",
                                      "xc_interface_close")]  # fmt: skip
    assert tail == ["xenevtchn_unbind", "munmap", "xc_monitor_disable", "xc_interface_close"]
    dom.close()  # idempotent
    assert xc.names().count("xc_interface_close") == 1


def test_pv_domain_has_no_event_source() -> None:
    gen = make(hvm=False)
    dom, xc, _, _ = next(gen)
    assert dom.guest_type is GuestType.PV
    assert dom.capabilities == Capability.WRITE_REGISTERS | Capability.FPU_REGISTERS
    assert "xc_monitor_enable" not in xc.names()
    assert dom.poll_event(0.01) is None
    assert dom.event_fd() >= 0
    xc.pv.x64.user_regs.rip = 0xFFFFFFFF80001000
    assert dom.get_registers(0)["rip"] == 0xFFFFFFFF80001000
    dom.set_registers(0, {"rax": 3})
    assert xc.pv.x64.user_regs.rax == 3
    with pytest.raises(Unsupported):
        dom.monitor(EventKind.SOFTWARE_BREAKPOINT, True)
    dom.close()


def test_resolve_by_id_and_name() -> None:
    from xendbg.backend.xen import listing
    from xendbg.errors import DomainGone

    xc = FakeXenCtrl()
    assert listing.resolve(xc, None, 7) == 7  # type: ignore[arg-type]
    assert listing.resolve(xc, None, "7") == 7  # type: ignore[arg-type]
    with pytest.raises(DomainGone):
        listing.resolve(xc, None, 3)  # type: ignore[arg-type]
    with pytest.raises(XendbgError, match="no domain named 'web'"):
        listing.resolve(xc, None, "web")  # type: ignore[arg-type]
    (info,) = listing.list_domains(xc, None)  # type: ignore[arg-type]
    assert (info.domid, info.guest_type, info.word_size, info.max_vcpus) == (
        7,
        GuestType.PVH,
        8,
        2,
    )
