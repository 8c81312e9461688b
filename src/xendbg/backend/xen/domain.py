"""XenDomain: the Domain interface over libxenctrl, foreign memory and vm_event.

* Memory is guest-physical only (page walks happen in the engine with each
  vCPU's CR3); a range maps in one ``xenforeignmemory_map`` call and a page
  that fails raises GuestMemoryFault at that page before anything is read or
  written.  For PV guests "physical" means machine frames, the frames their
  page tables and CR3 hold.
* Registers: HVM/PVH through the HVM save context, PV through
  vcpu_guest_context (see ``context``).
* Events (HVM/PVH): one monitor ring per domain (``xc_monitor_enable``), its
  event channel, the sans-I/O ``vm_event.BackRing``; capabilities come from
  ``xc_monitor_get_capabilities`` and a mem_access probe.  PV domains have no
  vm_event ring (Xen refuses it) and offer no event source here.
* ``close`` undoes everything in reverse: monitors, page rights, pending
  events, our pauses, the channel, the ring, the handles.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno as E
import functools
import os
import select
import time
from collections import deque
from collections.abc import Callable, Mapping

from xendbg.backend.base import Access, Capability, Domain, Event, EventKind, GuestType, Response
from xendbg.backend.xen import context, listing, structs, vm_event
from xendbg.backend.xen._lib import XtlLogger
from xendbg.backend.xen.xenctrl import (
    XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_OFF,
    XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON,
    XenCtrl,
)
from xendbg.backend.xen.xendevicemodel import (
    NO_ERROR_CODE,
    DeviceModel,
    XEN_DMOP_EVENT_hw_exc,
    XEN_DMOP_EVENT_sw_exc,
)
from xendbg.backend.xen.xenevtchn import EventChannel
from xendbg.backend.xen.xenforeignmemory import PROT_READ, PROT_WRITE, ForeignMapping, ForeignMemory
from xendbg.backend.xen.xenstore import XenStore
from xendbg.errors import (
    BackendError,
    DomainBusy,
    GuestMemoryFault,
    Unsupported,
    XendbgError,
)

# XEN_DOMCTL_MONITOR_EVENT_* bit → capability (domctl.h).
MONITOR_CAPABILITIES = {
    0: Capability.WRITE_CTRLREG,
    1: Capability.MOV_TO_MSR,
    2: Capability.SINGLESTEP,
    3: Capability.SOFTWARE_BREAKPOINT,
    5: Capability.DEBUG_EXCEPTION | Capability.DEBUG_REGISTERS,
    6: Capability.CPUID,
}
UNSUPPORTED_ERRNOS = (E.EOPNOTSUPP, E.ENODEV, E.ENOSYS, E.EINVAL)
MAP_CHUNK_PAGES = 1024  # pages per xenforeignmemory_map call (4 MiB)
X86_TRAP_DB = 1
X86_TRAP_BP = 3


def capabilities_from_monitor(bitmap: int) -> Capability:
    """Event capabilities announced by ``xc_monitor_get_capabilities``."""
    caps = Capability.NONE
    for bit, cap in MONITOR_CAPABILITIES.items():
        if bitmap >> bit & 1:
            caps |= cap
    return caps


def fault_page(base: int, gpa: int, errors: list[int]) -> tuple[int, int] | None:
    """(first faulting address, errno) among pages mapped from address ``base``, or None.

    ``gpa`` is where the access starts: a fault in its first page is reported there.
    """
    for i, err in enumerate(errors):
        if err:
            return max(base + i * structs.PAGE_SIZE, gpa), err
    return None


def frames_of(gpa: int, size: int) -> list[int]:
    first = gpa >> structs.PAGE_SHIFT
    last = (gpa + max(size, 1) - 1) >> structs.PAGE_SHIFT
    return list(range(first, last + 1))


@dataclasses.dataclass(frozen=True)
class XenLibraries:
    """Where XenDomain gets its library handles: Xen's, unless a test says otherwise."""

    xenctrl: Callable[[], XenCtrl] = XenCtrl
    xenstore: Callable[[], XenStore] = XenStore
    foreignmemory: Callable[[XtlLogger], ForeignMemory] = ForeignMemory
    evtchn: Callable[[XtlLogger], EventChannel] = EventChannel
    devicemodel: Callable[[XtlLogger], DeviceModel] = DeviceModel


class XenDomain(Domain):
    """A running Xen domain, attached by id."""

    def __init__(
        self, domid: int, *, events: bool = True, libs: XenLibraries | None = None
    ) -> None:
        self.libs = libs or XenLibraries()
        self.domid = domid
        self._undo: list[Callable[[], None]] = []  # run in reverse by close()
        self._closed = False
        self._pauses = 0
        self._pending: dict[int, vm_event.Request] = {}
        self._queue: deque[tuple[Event, vm_event.Request]] = deque()
        self._singlestep: dict[int, bool] = {}
        self._monitors: set[tuple[EventKind, int | None]] = set()
        self._orig_access: dict[int, int] = {}
        self._ring: vm_event.BackRing | None = None
        self._port: int | None = None
        self._idle_fds: tuple[int, int] | None = None
        self.mem_access_why = "not an HVM guest"
        self.xc = self.libs.xenctrl()
        self._undo.append(self.xc.close)
        try:
            self._attach(events)
        except BaseException:
            self.close()
            raise

    # -- attach ---------------------------------------------------------------
    def _attach(self, events: bool) -> None:
        try:
            self.xs: XenStore | None = self.libs.xenstore()
            self._undo.append(self.xs.close)
        except XendbgError:
            self.xs = None  # names are a nicety: run without xenstored
        info = listing.domain_info(self.xc, self.domid)
        self.name = listing.domain_name(self.xs, self.domid)
        self.guest_type = listing.guest_type_of(int(info.flags), listing.emulation_flags(info))
        self.vcpu_count = int(info.max_vcpu_id) + 1
        self.word_size = listing.word_size_of(self.xc, self.domid, self.guest_type) or 8
        self._logger = XtlLogger(quiet=not os.environ.get("XENDBG_XEN_VERBOSE"))
        self._undo.append(self._logger.close)
        self.fmem = self.libs.foreignmemory(self._logger)
        self._undo.append(self.fmem.close)
        self.capabilities = Capability.WRITE_REGISTERS | Capability.FPU_REGISTERS
        self._singlestep = {v: False for v in range(self.vcpu_count)}
        if self.guest_type is not GuestType.PV and events:
            self._attach_events()

    def _attach_events(self) -> None:
        self.dm = self.libs.devicemodel(self._logger)
        self._undo.append(self.dm.close)
        self.capabilities |= Capability.INJECT_TRAP
        version = self.xc.vm_event_version()
        vm_event.check_version(version)
        try:
            ring_addr, remote_port = self.xc.monitor_enable(self.domid)
        except BackendError as exc:
            if exc.errno == E.EBUSY:
                raise DomainBusy(
                    f"domain {self.domid} already has a vm_event monitor ring (another "
                    "debugger attached, or one that exited without xc_monitor_disable)"
                ) from exc
            raise
        self._undo.append(lambda: self.xc.monitor_disable(self.domid))
        self._undo.append(lambda: self.xc.unmap_ring(ring_addr))
        page = (ctypes.c_char * structs.PAGE_SIZE).from_address(ring_addr)
        self._ring = vm_event.BackRing(memoryview(page).cast("B"), version, init=True)
        self.evtchn = self.libs.evtchn(self._logger)
        self._undo.append(self.evtchn.close)
        port = self._port = self.evtchn.bind_interdomain(self.domid, remote_port)
        self._undo.append(lambda: self.evtchn.unbind(port))
        self.capabilities |= capabilities_from_monitor(self.xc.monitor_capabilities(self.domid))
        try:
            self.xc.get_mem_access(self.domid, 0)
            self.capabilities |= Capability.MEM_ACCESS
            self.mem_access_why = ""
        except BackendError as exc:
            self.mem_access_why = (
                f"xc_get_mem_access: errno {exc.errno} ({os.strerror(exc.errno)}); "
                "Xen 4.17 offers mem_access only on Intel VMX with EPT"
            )

    # -- run control ------------------------------------------------------------
    def pause(self) -> None:
        self.xc.domain_pause(self.domid)
        self._pauses += 1

    def unpause(self) -> None:
        if not self._pauses:
            raise BackendError("xc_domain_unpause", 0, "the domain is not paused by us")
        self.xc.domain_unpause(self.domid)
        self._pauses -= 1

    @property
    def paused(self) -> bool:
        return self._pauses > 0

    # -- memory -------------------------------------------------------------------
    def _access_phys(self, gpa: int, size: int, prot: int, act: Callable[[int, int], None]) -> None:
        """Map [gpa, gpa+size) chunk by chunk, check every page, then ``act(addr, n)``
        on each mapped piece in order: nothing is touched if any page is missing."""
        frames = frames_of(gpa, size)
        maps: list[ForeignMapping] = []
        try:
            for i in range(0, len(frames), MAP_CHUNK_PAGES):
                chunk = frames[i : i + MAP_CHUNK_PAGES]
                m = self.fmem.map(self.domid, prot, chunk)
                maps.append(m)
                base = chunk[0] << structs.PAGE_SHIFT
                bad = fault_page(base, gpa, m.errors)
                if bad is None and not m.addr:
                    bad = (max(base, gpa), E.EFAULT)
                if bad is not None:
                    reason = f"xenforeignmemory_map: {os.strerror(bad[1])}"
                    raise GuestMemoryFault(bad[0], reason)
            offset = gpa & (structs.PAGE_SIZE - 1)
            done = 0
            for m in maps:
                n = min(len(m.errors) * structs.PAGE_SIZE - offset, size - done)
                act(m.addr + offset, n)
                done += n
                offset = 0
        finally:
            for m in maps:
                m.close()

    def read_phys(self, gpa: int, size: int) -> bytes:
        if size <= 0:
            return b""
        # One copy out of the mapping per chunk (fresh pages are costly in a PV dom0).
        pieces: list[bytes] = []
        self._access_phys(gpa, size, PROT_READ, lambda a, n: pieces.append(ctypes.string_at(a, n)))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def write_phys(self, gpa: int, data: bytes) -> None:
        if not data:
            return
        view = memoryview(bytes(data))
        pos = [0]

        def put(addr: int, n: int) -> None:
            ctypes.memmove(addr, bytes(view[pos[0] : pos[0] + n]), n)
            pos[0] += n

        self._access_phys(gpa, len(data), PROT_READ | PROT_WRITE, put)

    # -- registers ------------------------------------------------------------------
    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.vcpu_count:
            raise XendbgError(f"domain {self.domid} has no vCPU {vcpu} (0-{self.vcpu_count - 1})")

    def _hvm_cpu(self, vcpu: int) -> structs.hvm_hw_cpu:
        raw = self.xc.hvm_getcontext_partial(
            self.domid, structs.HVM_SAVE_CODE_CPU, vcpu, ctypes.sizeof(structs.hvm_hw_cpu)
        )
        return structs.hvm_hw_cpu.from_buffer_copy(raw)

    def get_registers(self, vcpu: int) -> dict[str, int]:
        self._check_vcpu(vcpu)
        if self.guest_type is GuestType.PV:
            ctx = self.xc.vcpu_getcontext(self.domid, vcpu)
            if self.word_size == 8:
                return context.pv64_to_regs(ctx.x64)
            return context.pv32_to_regs(ctx.x32)
        return context.hvm_cpu_to_regs(self._hvm_cpu(vcpu))

    def set_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        self._check_vcpu(vcpu)
        if not values:
            return
        if self.guest_type is GuestType.PV:
            ctx = self.xc.vcpu_getcontext(self.domid, vcpu)
            if self.word_size == 8:
                context.apply_pv64(ctx.x64, values)
            else:
                context.apply_pv32(ctx.x32, values)
            self.xc.vcpu_setcontext(self.domid, vcpu, ctx)
            return
        context.check_names(values, context.HVM_WRITABLE, "an HVM vCPU")
        # The whole context goes back (hvm_load downs vCPUs without a CPU record):
        # no vCPU may move between the read and the write.
        self.xc.domain_pause(self.domid)
        try:
            blob = self.xc.hvm_getcontext(self.domid)
            context.patch_hvm_context(blob, vcpu, values)
            self.xc.hvm_setcontext(self.domid, blob)
        finally:
            self.xc.domain_unpause(self.domid)

    # -- events: configuration -------------------------------------------------------
    def _unsupported(self, op: str, exc: BackendError) -> XendbgError:
        if exc.errno in UNSUPPORTED_ERRNOS:
            return Unsupported(op, str(exc))
        return exc

    def monitor(self, kind: EventKind, enable: bool, *, index: int | None = None) -> None:
        cap = {
            EventKind.SOFTWARE_BREAKPOINT: Capability.SOFTWARE_BREAKPOINT,
            EventKind.SINGLESTEP: Capability.SINGLESTEP,
            EventKind.DEBUG_EXCEPTION: Capability.DEBUG_EXCEPTION,
            EventKind.MEM_ACCESS: Capability.MEM_ACCESS,
            EventKind.WRITE_CTRLREG: Capability.WRITE_CTRLREG,
            EventKind.MOV_TO_MSR: Capability.MOV_TO_MSR,
            EventKind.CPUID: Capability.CPUID,
        }[kind]
        self.require(cap, f"monitor {kind.value}")
        key = (kind, index)
        if enable == (key in self._monitors):
            return
        try:
            self._set_monitor(kind, enable, index)
        except BackendError as exc:
            raise self._unsupported(f"monitor {kind.value}", exc) from exc
        if enable:
            self._monitors.add(key)
        else:
            self._monitors.discard(key)

    def _set_monitor(self, kind: EventKind, enable: bool, index: int | None) -> None:
        d = self.domid
        if kind is EventKind.SOFTWARE_BREAKPOINT:
            self.xc.monitor_software_breakpoint(d, enable)
        elif kind is EventKind.SINGLESTEP:
            self.xc.monitor_singlestep(d, enable)
        elif kind is EventKind.DEBUG_EXCEPTION:
            self.xc.monitor_debug_exceptions(d, enable, sync=True)
        elif kind is EventKind.CPUID:
            self.xc.monitor_cpuid(d, enable)
        elif kind is EventKind.WRITE_CTRLREG:
            if index not in vm_event.INDEX_BY_CTRLREG:
                raise XendbgError(f"WRITE_CTRLREG watches CR0, CR3 or CR4, not {index}")
            self.xc.monitor_write_ctrlreg(d, vm_event.INDEX_BY_CTRLREG[index], enable)
        elif kind is EventKind.MOV_TO_MSR:
            if index is None:
                raise XendbgError("MOV_TO_MSR needs the MSR index")
            self.xc.monitor_mov_to_msr(d, index, enable)
        # MEM_ACCESS needs no switch: page rights raise the events.

    def set_singlestep(self, vcpu: int, enable: bool) -> None:
        self.require(Capability.SINGLESTEP, "set_singlestep")
        self._check_vcpu(vcpu)
        self.monitor(EventKind.SINGLESTEP, True)
        op = XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON if enable else XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_OFF
        try:
            self.xc.debug_control(self.domid, op, vcpu)
        except BackendError as exc:
            raise self._unsupported("set_singlestep", exc) from exc
        self._singlestep[vcpu] = enable

    def set_mem_access(self, gfn: int, access: Access) -> None:
        if Capability.MEM_ACCESS not in self.capabilities:
            raise Unsupported("set_mem_access", self.mem_access_why)
        if gfn not in self._orig_access:
            self._orig_access[gfn] = self.xc.get_mem_access(self.domid, gfn)
        # XENMEM_access_n … _rwx are 0-7 with R=1, W=2, X=4, as Access.
        self.xc.set_mem_access(self.domid, access.value, gfn)

    def get_mem_access(self, gfn: int) -> Access:
        if Capability.MEM_ACCESS not in self.capabilities:
            raise Unsupported("get_mem_access", self.mem_access_why)
        value = self.xc.get_mem_access(self.domid, gfn)
        return Access(value & 7)

    def inject_trap(self, vcpu: int, vector: int, error_code: int | None = None) -> None:
        self.require(Capability.INJECT_TRAP, "inject_trap")
        self._check_vcpu(vcpu)
        code = NO_ERROR_CODE if error_code is None else error_code
        self.dm.inject_event(self.domid, vcpu, vector, XEN_DMOP_EVENT_hw_exc, code)

    # -- events: delivery -------------------------------------------------------------
    def event_fd(self) -> int:
        if self._ring is not None:
            return self.evtchn.fd()
        return self._idle_fd()

    def _idle_fd(self) -> int:
        """Without an event source: the read end of a pipe nobody writes."""
        if self._idle_fds is None:
            self._idle_fds = os.pipe()
            for fd in self._idle_fds:
                self._undo.append(functools.partial(os.close, fd))
        return self._idle_fds[0]

    def _ack_notification(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for the channel; consume and unmask what fired.

        Unmasking comes before the ring is read again, so a request published
        after our last look raises a fresh notification instead of being lost.
        """
        fd = self.evtchn.fd()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        port = self.evtchn.pending()
        self.evtchn.unmask(port)
        return True

    def _drain(self) -> None:
        """Move every request off the ring into the queue; answer foreign reasons."""
        ring = self._ring
        if ring is None:
            return
        while ring.final_check_for_requests():
            req = vm_event.Request.parse(ring.get_request(), ring.version)
            event = vm_event.to_event(req)
            if event is None:  # a reason we never enabled: let the vCPU go
                self._answer(req, vm_event.response_flags(req, Response()))
                continue
            if event.kind is EventKind.DEBUG_EXCEPTION and event.dr6 is None:
                # Not in the request (vm_event.debug_dr6): from the vCPU's state.
                regs = context.hvm_cpu_to_regs(self._hvm_cpu(event.vcpu))
                event = dataclasses.replace(event, dr6=vm_event.infer_dr6(regs))
            self._queue.append((event, req))

    def _answer(
        self, req: vm_event.Request, flags: int, regs: Mapping[str, int] | None = None
    ) -> None:
        assert self._ring is not None and self._port is not None
        self._ring.put_response(vm_event.encode_response(req, flags, regs))
        self._ring.push_responses()
        # Xen takes responses when the channel fires (vm_event_resume), whatever rsp_event says.
        self.evtchn.notify(self._port)

    def poll_event(self, timeout: float | None = 0.0) -> Event | None:
        if self._ring is None:
            select.select([self._idle_fd()], [], [], timeout)
            return None
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            self._ack_notification(0)
            self._drain()
            if self._queue:
                event, req = self._queue.popleft()
                self._pending[event.vcpu] = req
                return event
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._ack_notification(left)

    def resume(self, event: Event, response: Response | None = None) -> None:
        req = self._pending.pop(event.vcpu, None)
        if req is None:
            raise XendbgError(f"vCPU {event.vcpu} has no pending event to answer")
        response = response or Response()
        try:
            self._respond(event, req, response)
        except BaseException:
            self._pending[event.vcpu] = req
            raise

    def _respond(self, event: Event, req: vm_event.Request, response: Response) -> None:
        vcpu = event.vcpu
        direct = {k: v for k, v in response.registers.items() if k in vm_event.SET_REGISTERS_NAMES}
        others = {k: v for k, v in response.registers.items() if k not in direct}
        context.check_names(others, context.HVM_WRITABLE, "an HVM vCPU")
        toggle = False
        if response.singlestep is not None:
            self.require(Capability.SINGLESTEP, "Response.singlestep")
            self.monitor(EventKind.SINGLESTEP, True)
            toggle = response.singlestep != self._singlestep[vcpu]
        if others:
            self.set_registers(vcpu, others)
        regs = None
        if direct:
            # SET_REGISTERS writes every GPR, rip and rflags: start from their values now.
            current = self.get_registers(vcpu)
            regs = {n: current[n] for n in vm_event.SET_REGISTERS_NAMES} | direct
        if response.reinject:
            self._reinject(event, req)
        flags = vm_event.response_flags(
            req,
            Response(response.allow, response.reinject, direct, response.singlestep),
            toggle_singlestep=toggle,
        )
        self._answer(req, flags, regs)
        if toggle and response.singlestep is not None:
            self._singlestep[vcpu] = response.singlestep

    def _reinject(self, event: Event, req: vm_event.Request) -> None:
        self.require(Capability.INJECT_TRAP, "Response.reinject")
        u = req.st.u
        if event.kind is EventKind.SOFTWARE_BREAKPOINT:
            kind = int(u.software_breakpoint.type) or XEN_DMOP_EVENT_sw_exc
            self.dm.inject_event(
                self.domid, event.vcpu, X86_TRAP_BP, kind, NO_ERROR_CODE, event.insn_length
            )
        elif event.kind is EventKind.DEBUG_EXCEPTION:
            kind = int(u.debug_exception.type) or XEN_DMOP_EVENT_hw_exc
            self.dm.inject_event(
                self.domid,
                event.vcpu,
                X86_TRAP_DB,
                kind,
                NO_ERROR_CODE,
                event.insn_length,
                event.dr6 or 0,  # the pending DR6 bits the guest's handler will see
            )
        else:
            raise XendbgError(f"{event.kind.value} events carry no trap to re-inject")

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []

        def attempt(fn: Callable[[], object]) -> None:
            try:
                fn()
            except BaseException as exc:  # keep undoing: leave the guest as found
                errors.append(exc)

        for kind, index in list(self._monitors):
            attempt(functools.partial(self._set_monitor, kind, False, index))
        self._monitors.clear()
        off = XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_OFF
        for vcpu in [v for v, on in self._singlestep.items() if on]:
            attempt(functools.partial(self.xc.debug_control, self.domid, off, vcpu))
        for gfn, access in self._orig_access.items():
            attempt(functools.partial(self.xc.set_mem_access, self.domid, access, gfn))
        self._orig_access.clear()
        if self._ring is not None:
            attempt(self._drain)
            pending = list(self._pending.values()) + [req for _, req in self._queue]
            for req in pending:
                flags = req.flags & vm_event.VM_EVENT_FLAG_VCPU_PAUSED
                attempt(functools.partial(self._answer, req, flags))
        self._pending.clear()
        self._queue.clear()
        while self._pauses:
            self._pauses -= 1
            attempt(functools.partial(self.xc.domain_unpause, self.domid))
        for undo in reversed(self._undo):
            attempt(undo)
        self._undo.clear()
        if errors:
            first = errors[0]
            if isinstance(first, XendbgError):
                raise first
            raise BackendError("close", 0, str(first)) from first


def attach(target: str | int, *, events: bool = True) -> XenDomain:
    """Attach to a domain given by id or by name (``xendbg --attach NAME``)."""
    libs = XenLibraries()
    with libs.xenctrl() as xc:
        try:
            xs: XenStore | None = libs.xenstore()
        except XendbgError:
            xs = None
        try:
            domid = listing.resolve(xc, xs, target)
        finally:
            if xs is not None:
                xs.close()
    return XenDomain(domid, events=events, libs=libs)
