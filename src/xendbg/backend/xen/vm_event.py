"""The vm_event ring protocol, sans I/O: a shared page in, requests out, responses in.

Theory of operation.  ``xc_monitor_enable`` maps one shared page (io/ring.h's
``vm_event_sring``): a 64-byte header (``req_prod``, ``req_event``,
``rsp_prod``, ``rsp_event``, padding) and a power-of-two array of entries, each
a ``vm_event_st`` of the hypervisor's interface version.  Xen is the *front*
end: it produces requests (one per event; the vCPU stays paused when the
request has ``VM_EVENT_FLAG_VCPU_PAUSED``) and consumes responses.  We are the
*back* end: ``BackRing`` consumes requests and produces responses, with the
same free-running 32-bit indices and event-index rules as the C macros
(RING_GET_REQUEST, RING_PUSH_RESPONSES_AND_CHECK_NOTIFY,
RING_FINAL_CHECK_FOR_REQUESTS).  Nothing here touches a file descriptor or a
hypercall: ``XenDomain`` moves the notifications (xenevtchn) and this module
moves bytes, so every rule is unit-tested on a bytearray.

Ordering: x86 keeps stores in program order (TSO), which gives the xen_wmb()
of the C macros; an index is always written after the entries it publishes.

Decoding: ``Request`` wraps one entry; ``to_event`` turns it into a backend
``Event``; ``response_flags`` and ``encode_response`` build the answer from a
backend ``Response`` (seed 000, "Reading events"; vm_event.h flag comments).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from xendbg.arch.x86.regnames import GPRS64
from xendbg.backend.base import Access, Event, EventKind, Response
from xendbg.backend.xen import structs
from xendbg.errors import BackendError, Unsupported

# ---------------------------------------------------------------------------
# vm_event.h constants

VM_EVENT_FLAG_VCPU_PAUSED = 1 << 0
VM_EVENT_FLAG_FOREIGN = 1 << 1
VM_EVENT_FLAG_EMULATE = 1 << 2
VM_EVENT_FLAG_EMULATE_NOWRITE = 1 << 3
VM_EVENT_FLAG_TOGGLE_SINGLESTEP = 1 << 4
VM_EVENT_FLAG_SET_EMUL_READ_DATA = 1 << 5
VM_EVENT_FLAG_DENY = 1 << 6
VM_EVENT_FLAG_ALTERNATE_P2M = 1 << 7
VM_EVENT_FLAG_SET_REGISTERS = 1 << 8

VM_EVENT_REASON_UNKNOWN = 0
VM_EVENT_REASON_MEM_ACCESS = 1
VM_EVENT_REASON_MEM_SHARING = 2
VM_EVENT_REASON_MEM_PAGING = 3
VM_EVENT_REASON_WRITE_CTRLREG = 4
VM_EVENT_REASON_MOV_TO_MSR = 5
VM_EVENT_REASON_SOFTWARE_BREAKPOINT = 6
VM_EVENT_REASON_SINGLESTEP = 7
VM_EVENT_REASON_GUEST_REQUEST = 8
VM_EVENT_REASON_DEBUG_EXCEPTION = 9
VM_EVENT_REASON_CPUID = 10

# VM_EVENT_X86_* (write_ctrlreg.index) → the control register number.
VM_EVENT_X86_CR0 = 0
VM_EVENT_X86_CR3 = 1
VM_EVENT_X86_CR4 = 2
VM_EVENT_X86_XCR0 = 3
CTRLREG_BY_INDEX = {VM_EVENT_X86_CR0: 0, VM_EVENT_X86_CR3: 3, VM_EVENT_X86_CR4: 4}
INDEX_BY_CTRLREG = {cr: index for index, cr in CTRLREG_BY_INDEX.items()}

MEM_ACCESS_R = 1 << 0
MEM_ACCESS_W = 1 << 1
MEM_ACCESS_X = 1 << 2
MEM_ACCESS_GLA_VALID = 1 << 3

KIND_BY_REASON = {
    VM_EVENT_REASON_MEM_ACCESS: EventKind.MEM_ACCESS,
    VM_EVENT_REASON_WRITE_CTRLREG: EventKind.WRITE_CTRLREG,
    VM_EVENT_REASON_MOV_TO_MSR: EventKind.MOV_TO_MSR,
    VM_EVENT_REASON_SOFTWARE_BREAKPOINT: EventKind.SOFTWARE_BREAKPOINT,
    VM_EVENT_REASON_SINGLESTEP: EventKind.SINGLESTEP,
    VM_EVENT_REASON_DEBUG_EXCEPTION: EventKind.DEBUG_EXCEPTION,
    VM_EVENT_REASON_CPUID: EventKind.CPUID,
}
REASON_BY_KIND = {kind: reason for reason, kind in KIND_BY_REASON.items()}

# Registers VM_EVENT_FLAG_SET_REGISTERS really writes on x86 (hvm_vm_event_set_registers):
# the general-purpose registers, rflags and rip.  Anything else goes through the context.
SET_REGISTERS_NAMES = frozenset((*GPRS64, "rip", "rflags"))

RING_IDX_MASK = 0xFFFFFFFF
_SRING = struct.Struct("<IIII")  # req_prod, req_event, rsp_prod, rsp_event
HEADER_SIZE = ctypes.sizeof(structs.vm_event_sring)


class VmEventVersionError(BackendError):
    """A request's ``version`` differs from the ring's interface version."""


def check_version(version: int) -> structs.VmEventTypes:
    """The layouts of ``version``, or Unsupported for a version we do not know."""
    if version not in structs.VM_EVENT_VERSIONS:
        known = ", ".join(map(str, structs.VM_EVENT_VERSIONS))
        raise Unsupported("vm_event", f"interface version {version} (this xendbg knows {known})")
    return structs.vm_event_types(version)


def _idx(value: int) -> int:
    return value & RING_IDX_MASK


class _Ring:
    """What both ends share: the page, its header fields and the entry array."""

    def __init__(self, page: memoryview | bytearray, version: int, size: int | None) -> None:
        self.types = check_version(version)
        self.version = version
        self.page = memoryview(page).cast("B")
        size = len(self.page) if size is None else size
        self.nr_ents = self.types.ring_entries(size)
        if self.nr_ents == 0:
            raise ValueError(f"a {size}-byte page holds no {self.types.entry_size}-byte entry")
        self.entry_size = self.types.entry_size

    def _get(self, field: int) -> int:
        return int.from_bytes(self.page[field * 4 : field * 4 + 4], "little")

    def _set(self, field: int, value: int) -> None:
        self.page[field * 4 : field * 4 + 4] = _idx(value).to_bytes(4, "little")

    # sring header fields
    req_prod = property(lambda self: self._get(0), lambda self, v: self._set(0, v))
    req_event = property(lambda self: self._get(1), lambda self, v: self._set(1, v))
    rsp_prod = property(lambda self: self._get(2), lambda self, v: self._set(2, v))
    rsp_event = property(lambda self: self._get(3), lambda self, v: self._set(3, v))

    def _slot(self, idx: int) -> slice:
        start = HEADER_SIZE + (idx & (self.nr_ents - 1)) * self.entry_size
        return slice(start, start + self.entry_size)

    def shared_ring_init(self, start: int = 0) -> None:
        """SHARED_RING_INIT: empty ring, event indices one past the producers,
        padding cleared.  ``start`` ≠ 0 places the free-running indices elsewhere
        (as a ring that has been in use), which is how wrap-around is tested."""
        self.page[:HEADER_SIZE] = bytes(HEADER_SIZE)
        self.req_prod = self.rsp_prod = start
        self.req_event = self.rsp_event = start + 1


class BackRing(_Ring):
    """The consumer of requests and producer of responses (dom0's side).

    ``init`` runs SHARED_RING_INIT first, as a back end does on a fresh page
    returned by ``xc_monitor_enable`` before any event source is enabled.
    """

    def __init__(
        self,
        page: memoryview | bytearray,
        version: int,
        *,
        size: int | None = None,
        init: bool = False,
        start: int = 0,
    ) -> None:
        super().__init__(page, version, size)
        if init:
            self.shared_ring_init(start)
        self.req_cons = _idx(start)  # BACK_RING_ATTACH(start); BACK_RING_INIT is start 0
        self.rsp_prod_pvt = _idx(start)

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS: requests published and not yet taken.

        Bounded by the free response slots, so a misbehaving producer that runs
        its index ahead cannot make us read slots we have not answered.
        """
        req = _idx(self.req_prod - self.req_cons)
        rsp = self.nr_ents - _idx(self.req_cons - self.rsp_prod_pvt)
        return min(req, rsp)

    def get_request(self) -> bytes:
        """RING_COPY_REQUEST of the next request; IndexError if there is none."""
        if not self.unconsumed_requests():
            raise IndexError("no unconsumed request on the ring")
        raw = bytes(self.page[self._slot(self.req_cons)])
        self.req_cons = _idx(self.req_cons + 1)
        return raw

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if work is pending.

        When the ring looks empty, ask to be notified of the next request
        (``req_event = req_cons + 1``) and look again, closing the window in
        which Xen published a request without seeing our new ``req_event``.
        """
        if self.unconsumed_requests():
            return True
        self.req_event = self.req_cons + 1
        return bool(self.unconsumed_requests())

    def pending_responses(self) -> int:
        """Requests taken and not yet answered."""
        return _idx(self.req_cons - self.rsp_prod_pvt)

    def put_response(self, raw: bytes) -> None:
        """Write a response in the next slot (private until ``push_responses``)."""
        if len(raw) != self.entry_size:
            raise ValueError(f"response is {len(raw)} bytes, entries are {self.entry_size}")
        if not self.pending_responses():
            raise IndexError("more responses than requests taken")
        self.page[self._slot(self.rsp_prod_pvt)] = raw
        self.rsp_prod_pvt = _idx(self.rsp_prod_pvt + 1)

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish; True if the front end asked
        to be notified of a response in the range just pushed (``rsp_event``)."""
        old, new = self.rsp_prod, self.rsp_prod_pvt
        self.rsp_prod = new
        return _idx(new - self.rsp_event) < _idx(new - old)


class FrontRing(_Ring):
    """The producer of requests, as the hypervisor runs it (xen/common/vm_event.c).

    Xendbg never acts as the front end against Xen; this is the other side of
    the protocol for tests and tools that replay recorded requests.
    """

    def __init__(
        self,
        page: memoryview | bytearray,
        version: int,
        *,
        size: int | None = None,
        init: bool = True,
        start: int = 0,
    ) -> None:
        super().__init__(page, version, size)
        if init:
            self.shared_ring_init(start)
        self.req_prod_pvt = _idx(start)  # FRONT_RING_ATTACH(start)
        self.rsp_cons = _idx(start)

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.nr_ents - _idx(self.req_prod_pvt - self.rsp_cons)

    def put_request(self, raw: bytes) -> None:
        if len(raw) != self.entry_size:
            raise ValueError(f"request is {len(raw)} bytes, entries are {self.entry_size}")
        if not self.free_requests():
            raise IndexError("ring full")
        self.page[self._slot(self.req_prod_pvt)] = raw
        self.req_prod_pvt = _idx(self.req_prod_pvt + 1)

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old, new = self.req_prod, self.req_prod_pvt
        self.req_prod = new
        return _idx(new - self.req_event) < _idx(new - old)

    def unconsumed_responses(self) -> int:
        return _idx(self.rsp_prod - self.rsp_cons)

    def get_response(self) -> bytes:
        if not self.unconsumed_responses():
            raise IndexError("no unconsumed response on the ring")
        raw = bytes(self.page[self._slot(self.rsp_cons)])
        self.rsp_cons = _idx(self.rsp_cons + 1)
        return raw

    def final_check_for_responses(self) -> bool:
        if self.unconsumed_responses():
            return True
        self.rsp_event = self.rsp_cons + 1
        return bool(self.unconsumed_responses())


# ---------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Request:
    """One ``vm_event_request_t`` copied off the ring."""

    raw: bytes
    version: int

    @property
    def st(self) -> ctypes.Structure:
        return structs.vm_event_types(self.version).st.from_buffer_copy(self.raw)

    @property
    def reason(self) -> int:
        return int(self.st.reason)

    @property
    def vcpu_id(self) -> int:
        return int(self.st.vcpu_id)

    @property
    def flags(self) -> int:
        return int(self.st.flags)

    @classmethod
    def parse(cls, raw: bytes, version: int) -> Request:
        """Check the entry's size and its ``version`` against the ring's."""
        types = check_version(version)
        if len(raw) != types.entry_size:
            raise ValueError(
                f"entry is {len(raw)} bytes, version {version} uses {types.entry_size}"
            )
        found = int.from_bytes(raw[:4], "little")
        if found != version:
            raise VmEventVersionError(
                "vm_event",
                0,
                f"request has interface version {found}, the ring uses {version}: "
                "the hypervisor and libxenctrl disagree",
            )
        return cls(bytes(raw), version)


def _access(flags: int) -> Access:
    out = Access.NONE
    if flags & MEM_ACCESS_R:
        out |= Access.R
    if flags & MEM_ACCESS_W:
        out |= Access.W
    if flags & MEM_ACCESS_X:
        out |= Access.X
    return out


DR6_STATUS = 0xE00F  # B0-B3, BD, BS, BT: the bits that say why #DB happened
DR6_BS = 1 << 14
RFLAGS_TF = 1 << 8


def debug_dr6(req: Request) -> int | None:
    """The DR6 bits of a DEBUG_EXCEPTION request, if the event carries them.

    ``u.debug_exception.pending_dbg`` (interface 6+) "behaves like the VT-x
    PENDING_DBG field", but Xen 4.14-4.20 fill it with 0 on both VMX and SVM;
    ``data.regs.x86.dr6`` (4+) is the vCPU's DR6 as saved for the event, which
    on SVM does not hold the new status bits yet (seen in the lab: 0xffff0ff0
    for a TF step).  None when neither says why: see ``infer_dr6``.
    """
    st = req.st
    if req.version >= 6 and st.u.debug_exception.pending_dbg:
        return int(st.u.debug_exception.pending_dbg)
    if req.version >= 4 and st.data.regs.x86.dr6 & DR6_STATUS:
        return int(st.data.regs.x86.dr6)
    return None


def infer_dr6(regs: Mapping[str, int]) -> int:
    """DR6 for a #DB whose status bits Xen did not report, from the vCPU's state.

    The vCPU's DR6 if it has status bits; else what the CPU would have set:
    BS when RFLAGS.TF is set (a single-step trap leaves TF set in the saved
    flags), Bn for each enabled execute breakpoint whose address is RIP (an
    instruction breakpoint faults before the instruction runs).  Data
    breakpoints cannot be told apart this way.
    """
    dr6 = regs.get("dr6", 0xFFFF0FF0)
    if dr6 & DR6_STATUS:
        return dr6
    dr7 = regs.get("dr7", 0)
    bits = DR6_BS if regs.get("rflags", 0) & RFLAGS_TF else 0
    for n in range(4):
        enabled = (dr7 >> (2 * n)) & 3
        rw = (dr7 >> (16 + 4 * n)) & 3
        if enabled and rw == 0 and regs.get(f"dr{n}") == regs.get("rip"):
            bits |= 1 << n
    return dr6 | bits


def to_event(req: Request) -> Event | None:
    """The backend ``Event`` for a request, or None for reasons xendbg never enables."""
    kind = KIND_BY_REASON.get(req.reason)
    if kind is None:
        return None
    st = req.st
    rip = int(st.data.regs.x86.rip)
    vcpu = req.vcpu_id
    u = st.u
    if kind is EventKind.SOFTWARE_BREAKPOINT:
        return Event(kind, vcpu, rip, insn_length=int(u.software_breakpoint.insn_length))
    if kind is EventKind.DEBUG_EXCEPTION:
        return Event(
            kind, vcpu, rip, insn_length=int(u.debug_exception.insn_length), dr6=debug_dr6(req)
        )
    if kind is EventKind.MEM_ACCESS:
        ma = u.mem_access
        gla = int(ma.gla) if ma.flags & MEM_ACCESS_GLA_VALID else None
        gpa = (int(ma.gfn) << structs.PAGE_SHIFT) + int(ma.offset)
        return Event(kind, vcpu, rip, gpa=gpa, gla=gla, access=_access(int(ma.flags)))
    if kind is EventKind.WRITE_CTRLREG:
        wc = u.write_ctrlreg
        return Event(
            kind,
            vcpu,
            rip,
            index=CTRLREG_BY_INDEX.get(int(wc.index)),
            old_value=int(wc.old_value),
            new_value=int(wc.new_value),
        )
    if kind is EventKind.MOV_TO_MSR:
        msr = u.mov_to_msr
        return Event(
            kind,
            vcpu,
            rip,
            index=int(msr.msr),
            old_value=int(msr.old_value),
            new_value=int(msr.new_value),
        )
    if kind is EventKind.CPUID:
        return Event(kind, vcpu, rip, insn_length=int(u.cpuid.insn_length), index=int(u.cpuid.leaf))
    return Event(kind, vcpu, rip)  # SINGLESTEP


def response_flags(req: Request, response: Response, *, toggle_singlestep: bool = False) -> int:
    """``vm_event_response_t.flags`` answering ``req`` as ``response`` says.

    VCPU_PAUSED is echoed so that Xen unpauses the vCPU (seed 000, "A note on
    pausing").  MEM_ACCESS: allow → EMULATE (the access happens once, rights
    stay), deny → EMULATE|EMULATE_NOWRITE (Xen honours NOWRITE only with
    EMULATE).  WRITE_CTRLREG / MOV_TO_MSR: deny → DENY.
    """
    flags = req.flags & VM_EVENT_FLAG_VCPU_PAUSED
    reason = req.reason
    if reason == VM_EVENT_REASON_MEM_ACCESS:
        flags |= VM_EVENT_FLAG_EMULATE
        if not response.allow:
            flags |= VM_EVENT_FLAG_EMULATE_NOWRITE
    elif reason in (VM_EVENT_REASON_WRITE_CTRLREG, VM_EVENT_REASON_MOV_TO_MSR):
        flags |= 0 if response.allow else VM_EVENT_FLAG_DENY
    if toggle_singlestep:
        flags |= VM_EVENT_FLAG_TOGGLE_SINGLESTEP
    if response.registers:
        flags |= VM_EVENT_FLAG_SET_REGISTERS
    return flags


def encode_response(req: Request, flags: int, regs: Mapping[str, int] | None = None) -> bytes:
    """A ``vm_event_response_t`` for ``req``.

    The event union ``u`` is copied from the request: Xen's emulation check
    reads ``u.mem_access`` of the response.  With ``regs`` (vm_event_regs_x86
    field names), ``data.regs.x86`` starts from the request's copy and takes
    those values; ``flags`` must then carry SET_REGISTERS.
    """
    types = structs.vm_event_types(req.version)
    rq = req.st
    rsp = types.st()
    rsp.version = req.version
    rsp.flags = flags
    rsp.reason = rq.reason
    rsp.vcpu_id = rq.vcpu_id
    rsp.altp2m_idx = rq.altp2m_idx
    rsp.u = rq.u
    if regs:
        if not flags & VM_EVENT_FLAG_SET_REGISTERS:
            raise ValueError("registers given without VM_EVENT_FLAG_SET_REGISTERS")
        rsp.data = rq.data
        x86 = rsp.data.regs.x86
        known = {f[0] for f in types.regs_x86._fields_}
        for name, value in regs.items():
            if name not in known:
                raise KeyError(f"vm_event_regs_x86 v{req.version} has no {name}")
            setattr(x86, name, value)
    return bytes(rsp)


def encode_request(version: int, reason: int, vcpu_id: int, flags: int = 0, **fields: int) -> bytes:
    """A request as Xen writes it, for tests and replay.  ``fields`` are dotted
    paths with ``__`` for dots: ``u__mem_access__gfn=5``, ``data__regs__x86__rip=…``."""
    types = check_version(version)
    st = types.st()
    st.version, st.reason, st.vcpu_id, st.flags = version, reason, vcpu_id, flags
    for path, value in fields.items():
        *parents, leaf = path.split("__")
        target: object = st
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)
    return bytes(st)
