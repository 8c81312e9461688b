"""The sans-I/O vm_event ring (backend/xen/vm_event.py) on a bytearray page.

The front end here is vm_event.FrontRing, the hypervisor's side of io/ring.h
written out in Python: Xen itself cannot run on this machine.
"""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xendbg.backend.base import Access, EventKind, Response
from xendbg.backend.xen import structs, vm_event
from xendbg.backend.xen.vm_event import BackRing, FrontRing, Request
from xendbg.errors import Unsupported

VERSIONS = structs.VM_EVENT_VERSIONS
PAGE = structs.PAGE_SIZE


def pair(version: int = 7, start: int = 0) -> tuple[bytearray, FrontRing, BackRing]:
    page = bytearray(PAGE)
    front = FrontRing(page, version, start=start)
    back = BackRing(page, version, start=start)
    return page, front, back


def request(version: int, n: int, reason: int = vm_event.VM_EVENT_REASON_SINGLESTEP) -> bytes:
    return vm_event.encode_request(
        version,
        reason,
        vcpu_id=n % 4,
        flags=vm_event.VM_EVENT_FLAG_VCPU_PAUSED,
        data__regs__x86__rip=0x1000 + n,
    )


def header(page: bytearray) -> tuple[int, int, int, int]:
    return struct.unpack_from("<IIII", page, 0)


# -- geometry and initialisation ---------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_geometry_follows_ring_size_macro(version: int) -> None:
    _, front, back = pair(version)
    entry = ctypes.sizeof(structs.vm_event_types(version).st)
    fit = (PAGE - 64) // entry
    assert back.nr_ents == front.nr_ents
    assert back.nr_ents & (back.nr_ents - 1) == 0  # a power of two
    assert back.nr_ents <= fit < 2 * back.nr_ents


def test_shared_ring_init_sets_event_indices_to_one() -> None:
    page = bytearray(b"\xaa" * PAGE)
    BackRing(page, 7, init=True)
    assert header(page) == (0, 1, 0, 1)
    assert page[16:64] == bytes(48)  # pvt and __pad cleared
    assert page[64] == 0xAA  # entries untouched


def test_unknown_version_is_unsupported() -> None:
    with pytest.raises(Unsupported, match="interface version 9"):
        BackRing(bytearray(PAGE), 9)


# -- requests in, responses out ------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_requests_arrive_in_order_and_responses_return(version: int) -> None:
    page, front, back = pair(version)
    for n in range(3):
        front.put_request(request(version, n))
    assert back.unconsumed_requests() == 0  # not published yet
    front.push_requests()
    assert back.unconsumed_requests() == 3
    got = [Request.parse(back.get_request(), version) for _ in range(3)]
    assert [int(r.st.data.regs.x86.rip) for r in got] == [0x1000, 0x1001, 0x1002]
    assert back.unconsumed_requests() == 0
    with pytest.raises(IndexError):
        back.get_request()
    for r in got:
        back.put_response(vm_event.encode_response(r, r.flags & 1))
    assert front.unconsumed_responses() == 0  # private until pushed
    back.push_responses()
    assert header(page)[2] == 3  # rsp_prod
    answers = [Request(front.get_response(), version) for _ in range(3)]
    assert [a.vcpu_id for a in answers] == [0, 1, 2]
    assert all(a.flags == vm_event.VM_EVENT_FLAG_VCPU_PAUSED for a in answers)


def test_more_responses_than_requests_is_refused() -> None:
    _, front, back = pair()
    front.put_request(request(7, 0))
    front.push_requests()
    req = Request.parse(back.get_request(), 7)
    back.put_response(vm_event.encode_response(req, 0))
    with pytest.raises(IndexError, match="more responses"):
        back.put_response(vm_event.encode_response(req, 0))
    with pytest.raises(ValueError):
        back.put_response(b"short")


def test_full_ring() -> None:
    _, front, back = pair()
    n = front.nr_ents
    for i in range(n):
        front.put_request(request(7, i))
    assert front.free_requests() == 0
    with pytest.raises(IndexError, match="full"):
        front.put_request(request(7, n))
    front.push_requests()
    assert back.unconsumed_requests() == n
    back.get_request()
    # The slot is free for Xen only once answered.
    assert front.free_requests() == 0
    back.put_response(vm_event.encode_response(Request.parse(request(7, 0), 7), 0))
    back.push_responses()
    front.get_response()
    assert front.free_requests() == 1


def test_a_runaway_producer_index_is_bounded_by_unanswered_slots() -> None:
    page, _, back = pair()
    struct.pack_into("<I", page, 0, 1000)  # req_prod far ahead of anything real
    assert back.unconsumed_requests() == back.nr_ents


# -- notification rules (event indices) ----------------------------------------------


def test_final_check_asks_for_the_next_request() -> None:
    page, front, back = pair()
    assert back.final_check_for_requests() is False
    assert header(page)[1] == 1  # req_event = req_cons + 1
    front.put_request(request(7, 0))
    assert front.push_requests() is True  # req_event 1 is in (0, 1]
    assert back.final_check_for_requests() is True
    back.get_request()
    assert back.final_check_for_requests() is False
    assert header(page)[1] == 2
    # Two more requests: only the push that crosses req_event notifies.
    front.put_request(request(7, 1))
    front.put_request(request(7, 2))
    assert front.push_requests() is True
    front.put_request(request(7, 3))
    assert front.push_requests() is False  # req_event (2) was already passed
    assert back.unconsumed_requests() == 3


def test_final_check_catches_a_request_published_meanwhile() -> None:
    page, front, back = pair()
    front.put_request(request(7, 0))
    front.push_requests()
    back.get_request()
    # Xen publishes again before we move req_event: the final check still sees it.
    front.put_request(request(7, 1))
    struct.pack_into("<I", page, 0, 2)
    assert back.final_check_for_requests() is True


def test_push_responses_notifies_only_when_asked() -> None:
    _, front, back = pair()
    for i in range(3):
        front.put_request(request(7, i))
    front.push_requests()
    reqs = [Request.parse(back.get_request(), 7) for _ in range(3)]
    # rsp_event = 1 after init: the first response crosses it.
    back.put_response(vm_event.encode_response(reqs[0], 0))
    assert back.push_responses() is True
    back.put_response(vm_event.encode_response(reqs[1], 0))
    assert back.push_responses() is False  # the front end has not asked again
    front.get_response()
    front.get_response()
    assert front.final_check_for_responses() is False  # sets rsp_event = 3
    back.put_response(vm_event.encode_response(reqs[2], 0))
    assert back.push_responses() is True


# -- properties: FIFO order, wrap-around of the 32-bit indices -----------------------


@settings(max_examples=60, deadline=None)
@given(
    version=st.sampled_from(VERSIONS),
    start=st.one_of(
        st.just(0), st.integers(0xFFFFFFFF - 40, 0xFFFFFFFF), st.integers(0, 2**32 - 1)
    ),
    batches=st.lists(st.integers(1, 8), min_size=1, max_size=12),
)
def test_fifo_across_wraparound(version: int, start: int, batches: list[int]) -> None:
    _, front, back = pair(version, start)
    sent = 0
    seen: list[int] = []
    answered = 0
    for k in batches:
        k = min(k, front.free_requests())
        for _ in range(k):
            front.put_request(request(version, sent))
            sent += 1
        front.push_requests()
        while back.final_check_for_requests():
            req = Request.parse(back.get_request(), version)
            seen.append(int(req.st.data.regs.x86.rip) - 0x1000)
            back.put_response(vm_event.encode_response(req, 0))
        back.push_responses()
        while front.unconsumed_responses():
            assert Request(front.get_response(), version).vcpu_id == answered % 4
            answered += 1
        assert back.pending_responses() == 0
    assert seen == list(range(sent))
    assert answered == sent
    assert back.req_cons == (start + sent) & 0xFFFFFFFF


# -- decoding requests into backend events ----------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_version_mismatch_is_a_clear_error(version: int) -> None:
    other = 7 if version != 7 else 6
    raw = bytearray(vm_event.encode_request(version, vm_event.VM_EVENT_REASON_SINGLESTEP, 0))
    struct.pack_into("<I", raw, 0, other)
    with pytest.raises(vm_event.VmEventVersionError, match=f"version {other}.*uses {version}"):
        Request.parse(bytes(raw), version)
    with pytest.raises(ValueError):
        Request.parse(bytes(raw[:-8]), version)


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_software_breakpoint(version: int) -> None:
    raw = vm_event.encode_request(
        version,
        vm_event.VM_EVENT_REASON_SOFTWARE_BREAKPOINT,
        2,
        vm_event.VM_EVENT_FLAG_VCPU_PAUSED,
        u__software_breakpoint__insn_length=1,
        u__software_breakpoint__type=6,
        data__regs__x86__rip=0xFFFF800000101234,
    )
    ev = vm_event.to_event(Request.parse(raw, version))
    assert ev is not None
    assert (ev.kind, ev.vcpu, ev.rip, ev.insn_length) == (
        EventKind.SOFTWARE_BREAKPOINT,
        2,
        0xFFFF800000101234,
        1,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_debug_exception_dr6_per_version(version: int) -> None:
    fields: dict[str, int] = {"data__regs__x86__rip": 0x4000}
    if version >= 4:
        fields["data__regs__x86__dr6"] = 0xFFFF0FF1  # B0
    if version >= 6:
        fields["u__debug_exception__pending_dbg"] = 0x4000  # BS
    raw = vm_event.encode_request(version, vm_event.VM_EVENT_REASON_DEBUG_EXCEPTION, 0, **fields)
    ev = vm_event.to_event(Request.parse(raw, version))
    assert ev is not None and ev.kind is EventKind.DEBUG_EXCEPTION
    expected = {3: None, 4: 0xFFFF0FF1, 5: 0xFFFF0FF1, 6: 0x4000, 7: 0x4000}[version]
    assert ev.dr6 == expected


def test_debug_exception_with_zero_pending_dbg_falls_back_to_regs_dr6() -> None:
    # Xen 4.14-4.20 pass pending_dbg = 0 from both VMX and SVM.
    raw = vm_event.encode_request(
        7, vm_event.VM_EVENT_REASON_DEBUG_EXCEPTION, 0, data__regs__x86__dr6=0xFFFF4FF0
    )
    ev = vm_event.to_event(Request.parse(raw, 7))
    assert ev is not None and ev.dr6 == 0xFFFF4FF0
    for stale in (0, 0xFFFF0FF0):  # no status bit: the lab's SVM reports 0xffff0ff0 for a step
        raw = vm_event.encode_request(
            7, vm_event.VM_EVENT_REASON_DEBUG_EXCEPTION, 0, data__regs__x86__dr6=stale
        )
        ev = vm_event.to_event(Request.parse(raw, 7))
        assert ev is not None and ev.dr6 is None  # the domain then infers it (infer_dr6)


def test_infer_dr6() -> None:
    base = {"dr6": 0xFFFF0FF0, "dr7": 0x400, "rflags": 0x2, "rip": 0x1000}
    base |= {"dr0": 0x1000, "dr1": 0x1000, "dr2": 0x2000, "dr3": 0x1000}
    assert vm_event.infer_dr6(base) == 0xFFFF0FF0
    assert vm_event.infer_dr6(base | {"rflags": 0x102}) == 0xFFFF4FF0  # TF: BS
    # DR7: L0 execute, G1 execute, L2 execute elsewhere, L3 enabled as a write watchpoint.
    dr7 = 0x400 | 0b01 | 0b10 << 2 | 0b01 << 4 | 0b01 << 6 | 0b01 << 28
    assert vm_event.infer_dr6(base | {"dr7": dr7}) == 0xFFFF0FF0 | 0b0011
    # The vCPU's own DR6 wins when it says why.
    assert vm_event.infer_dr6(base | {"dr6": 0xFFFF0FF4, "rflags": 0x102}) == 0xFFFF0FF4


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_mem_access(version: int) -> None:
    flags = vm_event.MEM_ACCESS_W | vm_event.MEM_ACCESS_GLA_VALID
    raw = vm_event.encode_request(
        version,
        vm_event.VM_EVENT_REASON_MEM_ACCESS,
        1,
        u__mem_access__gfn=0x1234,
        u__mem_access__offset=0x56,
        u__mem_access__gla=0x7FFF0056,
        u__mem_access__flags=flags,
    )
    ev = vm_event.to_event(Request.parse(raw, version))
    assert ev is not None
    assert (ev.kind, ev.gpa, ev.gla, ev.access) == (
        EventKind.MEM_ACCESS,
        0x1234056,
        0x7FFF0056,
        Access.W,
    )
    no_gla = vm_event.encode_request(
        version, vm_event.VM_EVENT_REASON_MEM_ACCESS, 1, u__mem_access__flags=5
    )
    ev = vm_event.to_event(Request.parse(no_gla, version))
    assert ev is not None and ev.gla is None and ev.access == Access.R | Access.X


@pytest.mark.parametrize(("index", "cr"), [(0, 0), (1, 3), (2, 4), (3, None)])
def test_decode_write_ctrlreg(index: int, cr: int | None) -> None:
    raw = vm_event.encode_request(
        7,
        vm_event.VM_EVENT_REASON_WRITE_CTRLREG,
        0,
        u__write_ctrlreg__index=index,
        u__write_ctrlreg__old_value=0x1000,
        u__write_ctrlreg__new_value=0x2000,
    )
    ev = vm_event.to_event(Request.parse(raw, 7))
    assert ev is not None
    assert (ev.kind, ev.index, ev.old_value, ev.new_value) == (
        EventKind.WRITE_CTRLREG,
        cr,
        0x1000,
        0x2000,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_msr_and_cpuid(version: int) -> None:
    raw = vm_event.encode_request(
        version,
        vm_event.VM_EVENT_REASON_MOV_TO_MSR,
        3,
        u__mov_to_msr__msr=0xC0000080,
        u__mov_to_msr__old_value=0x500,
        u__mov_to_msr__new_value=0xD01,
    )
    ev = vm_event.to_event(Request.parse(raw, version))
    assert ev is not None
    assert (ev.kind, ev.vcpu, ev.index, ev.old_value, ev.new_value) == (
        EventKind.MOV_TO_MSR,
        3,
        0xC0000080,
        0x500,
        0xD01,
    )
    raw = vm_event.encode_request(
        version, vm_event.VM_EVENT_REASON_CPUID, 0, u__cpuid__insn_length=2, u__cpuid__leaf=0xD
    )
    ev = vm_event.to_event(Request.parse(raw, version))
    assert ev is not None and (ev.kind, ev.insn_length, ev.index) == (EventKind.CPUID, 2, 0xD)


def test_reasons_xendbg_never_enables_decode_to_none() -> None:
    for reason in (vm_event.VM_EVENT_REASON_GUEST_REQUEST, 12, 13, 99):
        assert vm_event.to_event(Request.parse(vm_event.encode_request(7, reason, 0), 7)) is None
    assert set(vm_event.KIND_BY_REASON.values()) == set(EventKind)


# -- responses -----------------------------------------------------------------------


def _req(reason: int, flags: int = vm_event.VM_EVENT_FLAG_VCPU_PAUSED) -> Request:
    return Request.parse(vm_event.encode_request(7, reason, 1, flags), 7)


@pytest.mark.parametrize(
    ("reason", "response", "expected"),
    [
        (vm_event.VM_EVENT_REASON_SOFTWARE_BREAKPOINT, Response(), 0),
        (vm_event.VM_EVENT_REASON_SOFTWARE_BREAKPOINT, Response(allow=False), 0),
        (vm_event.VM_EVENT_REASON_MEM_ACCESS, Response(), vm_event.VM_EVENT_FLAG_EMULATE),
        (
            vm_event.VM_EVENT_REASON_MEM_ACCESS,
            Response(allow=False),
            vm_event.VM_EVENT_FLAG_EMULATE | vm_event.VM_EVENT_FLAG_EMULATE_NOWRITE,
        ),
        (vm_event.VM_EVENT_REASON_WRITE_CTRLREG, Response(), 0),
        (
            vm_event.VM_EVENT_REASON_WRITE_CTRLREG,
            Response(allow=False),
            vm_event.VM_EVENT_FLAG_DENY,
        ),
        (vm_event.VM_EVENT_REASON_MOV_TO_MSR, Response(allow=False), vm_event.VM_EVENT_FLAG_DENY),
        (
            vm_event.VM_EVENT_REASON_SINGLESTEP,
            Response(registers={"rip": 5}),
            vm_event.VM_EVENT_FLAG_SET_REGISTERS,
        ),
    ],
)
def test_response_flags(reason: int, response: Response, expected: int) -> None:
    paused = vm_event.VM_EVENT_FLAG_VCPU_PAUSED
    assert vm_event.response_flags(_req(reason), response) == expected | paused
    # A request whose vCPU was not paused does not get VCPU_PAUSED back.
    assert vm_event.response_flags(_req(reason, 0), response) == expected


def test_response_toggles_singlestep() -> None:
    req = _req(vm_event.VM_EVENT_REASON_DEBUG_EXCEPTION)
    flags = vm_event.response_flags(req, Response(), toggle_singlestep=True)
    assert flags & vm_event.VM_EVENT_FLAG_TOGGLE_SINGLESTEP


def test_encode_response_echoes_the_event_and_sets_registers() -> None:
    raw = vm_event.encode_request(
        7,
        vm_event.VM_EVENT_REASON_MEM_ACCESS,
        3,
        vm_event.VM_EVENT_FLAG_VCPU_PAUSED,
        altp2m_idx=2,
        u__mem_access__gfn=77,
        u__mem_access__flags=vm_event.MEM_ACCESS_W,
        data__regs__x86__rax=1,
        data__regs__x86__rip=0x100,
    )
    req = Request.parse(raw, 7)
    flags = vm_event.VM_EVENT_FLAG_VCPU_PAUSED | vm_event.VM_EVENT_FLAG_SET_REGISTERS
    rsp = Request.parse(vm_event.encode_response(req, flags, {"rip": 0x200, "rbx": 9}), 7).st
    assert (rsp.version, rsp.reason, rsp.vcpu_id, rsp.flags, rsp.altp2m_idx) == (
        7,
        vm_event.VM_EVENT_REASON_MEM_ACCESS,
        3,
        flags,
        2,
    )
    assert (rsp.u.mem_access.gfn, rsp.u.mem_access.flags) == (77, vm_event.MEM_ACCESS_W)
    x86 = rsp.data.regs.x86
    assert (x86.rip, x86.rbx, x86.rax) == (0x200, 9, 1)
    plain = Request.parse(vm_event.encode_response(req, 0), 7).st
    assert plain.data.regs.x86.rip == 0  # no SET_REGISTERS: no register block
    with pytest.raises(ValueError):
        vm_event.encode_response(req, 0, {"rip": 1})
    with pytest.raises(KeyError):
        vm_event.encode_response(req, flags, {"xmm0": 1})
