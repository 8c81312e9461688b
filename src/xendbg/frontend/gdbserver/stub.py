"""GDB/LLDB packet dispatch: typed requests (xendbg.rsp) → engine calls → reply payloads.

No I/O here: ``handle`` returns a reply payload, a ``Resume`` (the server runs the
guest and later sends ``stop_reply``), or a ``Detach`` (the server ends the session).
vCPU n is GDB thread n+1 (thread ids 0 and -1 mean "any" and "all").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xendbg.arch.x86 import registers as x86regs
from xendbg.backend.base import Capability
from xendbg.engine.session import Session
from xendbg.engine.stops import Stop, StopReason, WatchKind
from xendbg.errors import GuestMemoryFault, Unsupported, XendbgError
from xendbg.rsp import replies
from xendbg.rsp import requests as rq
from xendbg.rsp.fields import ThreadId, hex_encode

EFAULT = 0x0E
EINVAL = 0x16
ESRCH = 0x03
EIO = 0x05

MonitorFn = Callable[[str], str]

PACKET_SIZE = 0x4000
# Replies may carry fewer bytes than asked (GDB manual, 'm'); keep them in one packet.
MAX_READ_HEX = (PACKET_SIZE - 8) // 2
MAX_READ_BINARY = PACKET_SIZE // 2  # worst case every byte escaped


@dataclass(frozen=True, slots=True)
class Resume:
    step: int | None  # vCPU to single-step, or None: continue every vCPU


@dataclass(frozen=True, slots=True)
class Detach:
    reply: bytes | None  # what to send before closing (None: nothing, as for k)


Action = bytes | Resume | Detach


def tid_of(vcpu: int) -> ThreadId:
    return ThreadId(vcpu + 1)


class GdbStub:
    def __init__(self, session: Session, monitor: MonitorFn | None = None) -> None:
        self.s = session
        dom = session.domain
        self.layout = x86regs.layout(dom.word_size, Capability.FPU_REGISTERS in dom.capabilities)
        self.xml = x86regs.target_xml(self.layout).encode()
        self.monitor = monitor
        self.g_vcpu: int | None = None  # Hg
        self.c_vcpu: int | None = None  # Hc
        self.swbreak = False
        self.hwbreak = False
        self.list_threads = False
        self.error_strings = False
        self.lldb = False  # lldb announces itself with QThreadSuffixSupported
        self._handlers: dict[type[rq.Request], Callable[..., Action]] = {
            rq.Supported: self._supported,
            rq.StartNoAckMode: lambda r: replies.OK,
            rq.MustReplyEmpty: lambda r: replies.EMPTY,
            rq.ThreadSuffixSupported: self._thread_suffix,
            rq.ListThreadsInStopReply: self._list_threads,
            rq.EnableErrorStrings: self._error_strings,
            rq.HostInfo: self._host_info,
            rq.ProcessInfo: self._process_info,
            rq.XferRead: self._xfer,
            rq.RegisterInfo: self._register_info,
            rq.QueryHaltReason: lambda r: self.stop_reply(self.s.stop),
            rq.SetThread: self._set_thread,
            rq.ThreadAlive: self._thread_alive,
            rq.ThreadInfoFirst: lambda r: replies.thread_list(tid_of(v) for v in self.s.vcpus),
            rq.ThreadInfoNext: lambda r: b"l",
            rq.CurrentThread: lambda r: replies.current_thread(tid_of(self.s.current_vcpu)),
            rq.ThreadExtraInfo: self._thread_extra_info,
            rq.Attached: lambda r: b"1",
            rq.TraceStatus: lambda r: replies.EMPTY,
            rq.Offsets: lambda r: replies.EMPTY,
            rq.Symbol: lambda r: replies.OK,
            rq.ReadRegisters: self._read_registers,
            rq.WriteRegisters: self._write_registers,
            rq.ReadRegister: self._read_register,
            rq.WriteRegister: self._write_register,
            rq.ReadMemory: self._read_memory,
            rq.ReadMemoryBinary: self._read_memory_binary,
            rq.WriteMemory: self._write_memory,
            rq.WriteMemoryBinary: self._write_memory,
            rq.MemoryRegionInfo: self._memory_region_info,
            rq.WatchpointSupportInfo: lambda r: b"num:4;",
            rq.InsertBreakpoint: self._insert_breakpoint,
            rq.RemoveBreakpoint: self._remove_breakpoint,
            rq.VContQuery: lambda r: b"vCont;c;C;s;S",
            rq.VCont: self._vcont,
            rq.Continue: self._continue,
            rq.ContinueWithSignal: self._continue,
            rq.Step: self._step,
            rq.StepWithSignal: self._step,
            rq.MonitorCommand: self._monitor,
            rq.Detach: lambda r: Detach(replies.OK),
            rq.VKill: lambda r: Detach(replies.OK),
            rq.Kill: lambda r: Detach(None),
            rq.Malformed: lambda r: self._error(EINVAL, r.reason),
            rq.Unknown: lambda r: replies.EMPTY,
        }

    # -- entry point ------------------------------------------------------
    def handle(self, req: rq.Request) -> Action:
        handler = self._handlers.get(type(req))
        if handler is None:
            return replies.EMPTY
        try:
            return handler(req)
        except GuestMemoryFault as e:
            return self._error(EFAULT, str(e))
        except Unsupported:
            return replies.EMPTY
        except XendbgError as e:
            return self._error(EIO, str(e))

    def _error(self, code: int, text: str) -> bytes:
        return replies.error(code, text if self.error_strings else None)

    # -- threads ----------------------------------------------------------
    def _vcpu(self, thread: ThreadId | None, selected: int | None = None) -> int:
        if thread is None or thread.is_all or thread.is_any:
            return self.s.current_vcpu if selected is None else selected
        v = thread.tid - 1
        if v not in self.s.vcpus:
            raise XendbgError(f"no thread {thread.tid:#x}")
        return v

    def _set_thread(self, r: rq.SetThread) -> bytes:
        if r.thread.is_all or r.thread.is_any:
            v = None
        else:
            v = r.thread.tid - 1
            if v not in self.s.vcpus:
                return self._error(ESRCH, f"no thread {r.thread.tid:#x}")
        if r.op == "g":
            self.g_vcpu = v
        else:
            self.c_vcpu = v
        return replies.OK

    def _thread_alive(self, r: rq.ThreadAlive) -> bytes:
        if r.thread.tid - 1 in self.s.vcpus:
            return replies.OK
        return self._error(ESRCH, "no such thread")

    def _thread_extra_info(self, r: rq.ThreadExtraInfo) -> bytes:
        v = self._vcpu(r.thread)
        return hex_encode(f"vCPU {v}".encode())

    # -- feature negotiation ----------------------------------------------
    def _supported(self, r: rq.Supported) -> bytes:
        self.swbreak = r.features.get("swbreak") == "+"
        self.hwbreak = r.features.get("hwbreak") == "+"
        feats: dict[str, bool | int | str] = {
            "PacketSize": PACKET_SIZE,
            "qXfer:features:read": True,
            "QStartNoAckMode": True,
            "vContSupported": True,
            "multiprocess": False,
            "QThreadSuffixSupported": True,
            "QListThreadsInStopReply": True,
        }
        if self.swbreak:
            feats["swbreak"] = True
        if self.hwbreak:
            feats["hwbreak"] = True
        return replies.supported(feats)

    def _thread_suffix(self, r: rq.Request) -> bytes:
        self.lldb = True
        return replies.OK

    def _list_threads(self, r: rq.Request) -> bytes:
        self.list_threads = True
        return replies.OK

    def _error_strings(self, r: rq.Request) -> bytes:
        self.error_strings = True
        return replies.OK

    def _triple(self) -> str:
        arch = "x86_64" if self.s.domain.word_size == 8 else "i386"
        return f"{arch}-unknown-unknown".encode().hex()

    def _host_info(self, r: rq.Request) -> bytes:
        return replies.key_values(
            {
                "triple": self._triple(),
                "ptrsize": str(self.s.domain.word_size),
                "endian": "little",
                "hostname": b"xendbg".hex(),
            }
        )

    def _process_info(self, r: rq.Request) -> bytes:
        dom = self.s.domain
        return replies.key_values(
            {
                "pid": f"{dom.domid + 1:x}",
                "parent-pid": "1",
                "real-uid": "0",
                "real-gid": "0",
                "effective-uid": "0",
                "effective-gid": "0",
                "triple": self._triple(),
                "ostype": "unknown",
                "endian": "little",
                "ptrsize": str(dom.word_size),
                "name": dom.name.encode().hex(),
            }
        )

    def _xfer(self, r: rq.XferRead) -> bytes:
        if r.object == "features" and r.annex == "target.xml":
            return replies.xfer_read(self.xml, r.offset, r.length)
        return replies.EMPTY

    def _register_info(self, r: rq.RegisterInfo) -> bytes:
        info = x86regs.register_info(self.layout, r.regno)
        return info.encode() if info is not None else replies.error(0x45)

    # -- registers --------------------------------------------------------
    def _read_registers(self, r: rq.ReadRegisters) -> bytes:
        regs = self.s.registers(self._vcpu(r.thread, self.g_vcpu))
        return x86regs.g_hex(self.layout, regs).encode()

    def _write_registers(self, r: rq.WriteRegisters) -> bytes:
        v = self._vcpu(r.thread, self.g_vcpu)
        values = x86regs.decode_g(self.layout, r.data.hex())
        self._write_changed(v, values)
        return replies.OK

    def _write_changed(self, vcpu: int, values: dict[str, int]) -> None:
        """Write only what differs: G carries every register, most of them unchanged
        and some (descriptor tables, x87 on a backend without FPU) not writable."""
        current = self.s.registers(vcpu)
        changed: dict[str, int] = {}
        for name, value in values.items():
            old = current.get(name)
            if old is None:
                continue
            desc = self.layout.by_source(name)
            if value != old & desc.mask:
                changed[name] = (old & ~desc.mask) | value
        if changed:
            self.s.set_registers(vcpu, changed)

    def _desc(self, regno: int) -> x86regs.RegisterDesc:
        try:
            return self.layout.by_regnum(regno)
        except (KeyError, IndexError) as e:
            raise XendbgError(f"no register {regno:#x}") from e

    def _read_register(self, r: rq.ReadRegister) -> bytes:
        desc = self._desc(r.regno)
        value = self.s.registers(self._vcpu(r.thread, self.g_vcpu)).get(desc.source)
        if value is None and self.lldb:
            return self._error(0x45, f"{desc.name} is not available")
        return x86regs.reg_hex(desc, value).encode()

    def _write_register(self, r: rq.WriteRegister) -> bytes:
        desc = self._desc(r.regno)
        if len(r.value) != desc.size:
            return self._error(EINVAL, f"{desc.name} takes {desc.size} bytes")
        self._write_changed(
            self._vcpu(r.thread, self.g_vcpu), {desc.source: int.from_bytes(r.value, "little")}
        )
        return replies.OK

    # -- memory -----------------------------------------------------------
    def _read_memory(self, r: rq.ReadMemory) -> bytes:
        if r.length == 0:
            return replies.EMPTY
        v = self._vcpu(None, self.g_vcpu)
        size = min(r.length, MAX_READ_HEX)
        return replies.memory(self.s.read_memory(v, r.addr, size, partial=True))

    def _read_memory_binary(self, r: rq.ReadMemoryBinary) -> bytes:
        if r.length == 0:
            return replies.OK  # lldb's probe for x support
        v = self._vcpu(None, self.g_vcpu)
        size = min(r.length, MAX_READ_BINARY)
        return replies.binary_memory(self.s.read_memory(v, r.addr, size, partial=True))

    def _write_memory(self, r: rq.WriteMemory | rq.WriteMemoryBinary) -> bytes:
        if r.data:
            self.s.write_memory(self._vcpu(None, self.g_vcpu), r.addr, r.data)
        return replies.OK

    def _memory_region_info(self, r: rq.MemoryRegionInfo) -> bytes:
        from xendbg.arch.x86.paging import PageFault

        v = self._vcpu(None, self.g_vcpu)
        try:
            t = self.s.vmem.mmu.translate(self.s.paging(v), r.addr)
        except PageFault:
            page = r.addr & ~0xFFF
            return replies.key_values({"start": f"{page:x}", "size": "1000", "permissions": ""})
        perms = "r" + ("w" if t.writable else "") + ("" if t.nx else "x")
        return replies.key_values(
            {"start": f"{t.linear_base:x}", "size": f"{t.page_size:x}", "permissions": perms}
        )

    # -- breakpoints ------------------------------------------------------
    _WATCH = {
        rq.BreakpointType.WRITE_WATCHPOINT: WatchKind.WRITE,
        rq.BreakpointType.READ_WATCHPOINT: WatchKind.READ,
        rq.BreakpointType.ACCESS_WATCHPOINT: WatchKind.ACCESS,
    }

    def _insert_breakpoint(self, r: rq.InsertBreakpoint) -> bytes:
        if r.type in self._WATCH:
            self.s.insert_watchpoint(self._WATCH[r.type], r.addr, r.kind)
        else:
            hw = r.type is rq.BreakpointType.HARDWARE
            self.s.insert_breakpoint(r.addr, hardware=hw, vcpu=self._vcpu(None, self.g_vcpu))
        return replies.OK

    def _remove_breakpoint(self, r: rq.RemoveBreakpoint) -> bytes:
        if r.type in self._WATCH:
            self.s.remove_watchpoint(self._WATCH[r.type], r.addr, r.kind)
        else:
            self.s.remove_breakpoint(r.addr, hardware=r.type is rq.BreakpointType.HARDWARE)
        return replies.OK

    # -- execution --------------------------------------------------------
    def _set_pc(self, vcpu: int, addr: int | None) -> None:
        if addr is not None:
            self.s.set_registers(vcpu, {"rip": addr})

    def _continue(self, r: rq.Continue | rq.ContinueWithSignal) -> Action:
        self._set_pc(self._vcpu(None, self.c_vcpu), r.addr)
        return Resume(None)

    def _step(self, r: rq.Step | rq.StepWithSignal) -> Action:
        v = self._vcpu(None, self.c_vcpu)
        self._set_pc(v, r.addr)
        return Resume(v)

    def _vcont(self, r: rq.VCont) -> Action:
        for a in r.actions:
            if a.action in ("s", "S", "r"):
                return Resume(self._vcpu(a.thread, self.c_vcpu))
        if any(a.action in ("c", "C") for a in r.actions):
            return Resume(None)
        return self._error(EINVAL, "vCont without c or s action")

    # -- monitor ----------------------------------------------------------
    def _monitor(self, r: rq.MonitorCommand) -> bytes:
        if self.monitor is None:
            return replies.EMPTY
        out = self.monitor(r.command)
        return hex_encode(out.encode()) if out else replies.OK

    # -- stop replies -----------------------------------------------------
    def stop_reply(self, stop: Stop) -> bytes:
        reason: replies.StopReason | None = None
        if stop.reason is StopReason.SW_BREAKPOINT and self.swbreak:
            reason = replies.StopReason("swbreak")
        elif stop.reason is StopReason.HW_BREAKPOINT and self.hwbreak:
            reason = replies.StopReason("hwbreak")
        elif stop.reason is StopReason.WATCHPOINT and stop.watch_kind is not None:
            reason = replies.StopReason(stop.watch_kind.value, stop.watch_addr)
        expedite: dict[int, bytes] = {}
        try:
            regs = self.s.registers(stop.vcpu)
            for name in ("rip", "rsp", "rbp"):
                desc = self.layout.by_source(name)
                expedite[desc.regnum] = (regs[name] & desc.mask).to_bytes(desc.size, "little")
        except XendbgError:
            expedite = {}
        threads = pcs = None
        if self.list_threads:
            threads = [tid_of(v) for v in self.s.vcpus]
            try:
                pcs = [self.s.pc(v) for v in self.s.vcpus]
            except XendbgError:
                pcs = None
        return replies.stop_reply(
            stop.signal,
            thread=tid_of(stop.vcpu),
            reason=reason,
            registers=expedite,
            threads=threads,
            thread_pcs=pcs,
        )
