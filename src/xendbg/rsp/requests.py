"""Typed requests a client (gdb, lldb) sends to the stub, one class per packet.

Field names follow the GDB manual's packet descriptions (``addr``, ``length``,
``kind``, ``annex``...).  ``thread`` fields hold lldb's ``;thread:TID;`` suffix
(QThreadSuffixSupported) and are None when the client relies on ``Hg``/``Hc``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from xendbg.rsp.fields import ThreadId


@dataclass(frozen=True, slots=True)
class Request:
    """Base of every parsed packet."""


# --- status and registers ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryHaltReason(Request):
    """``?``: report why the target halted (answered with a stop reply)."""


@dataclass(frozen=True, slots=True)
class ReadRegisters(Request):
    """``g`` or ``g;thread:TID;``."""

    thread: ThreadId | None = None


@dataclass(frozen=True, slots=True)
class WriteRegisters(Request):
    """``G XX…`` (the register block, target byte order)."""

    data: bytes
    thread: ThreadId | None = None


@dataclass(frozen=True, slots=True)
class ReadRegister(Request):
    """``p n``."""

    regno: int
    thread: ThreadId | None = None


@dataclass(frozen=True, slots=True)
class WriteRegister(Request):
    """``P n=r`` (``value`` in target byte order)."""

    regno: int
    value: bytes
    thread: ThreadId | None = None


# --- memory --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadMemory(Request):
    """``m addr,length``: reply in hex."""

    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class ReadMemoryBinary(Request):
    """``x addr,length`` (lldb): reply in binary."""

    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteMemory(Request):
    """``M addr,length:XX…``."""

    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WriteMemoryBinary(Request):
    """``X addr,length:binary``; gdb probes support with a zero-length write."""

    addr: int
    data: bytes


# --- execution -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Continue(Request):
    """``c [addr]``."""

    addr: int | None = None


@dataclass(frozen=True, slots=True)
class ContinueWithSignal(Request):
    """``C sig[;addr]``."""

    signal: int
    addr: int | None = None


@dataclass(frozen=True, slots=True)
class Step(Request):
    """``s [addr]``."""

    addr: int | None = None


@dataclass(frozen=True, slots=True)
class StepWithSignal(Request):
    """``S sig[;addr]``."""

    signal: int
    addr: int | None = None


@dataclass(frozen=True, slots=True)
class VContQuery(Request):
    """``vCont?``: list the supported vCont actions."""


@dataclass(frozen=True, slots=True)
class VContAction:
    """One ``vCont`` action: ``c``, ``C sig``, ``s``, ``S sig``, ``t`` or ``r start,end``.

    ``thread`` is None when the action applies to every thread not named elsewhere.
    """

    action: str
    thread: ThreadId | None = None
    signal: int | None = None
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True, slots=True)
class VCont(Request):
    """``vCont;action[:thread-id]…``."""

    actions: tuple[VContAction, ...]


# --- breakpoints and watchpoints -----------------------------------------------------


class BreakpointType(enum.IntEnum):
    """The ``type`` of ``Z``/``z`` packets."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCHPOINT = 2
    READ_WATCHPOINT = 3
    ACCESS_WATCHPOINT = 4


@dataclass(frozen=True, slots=True)
class InsertBreakpoint(Request):
    """``Z type,addr,kind[;cond_list…][;cmds:…]``; the tail is kept raw, unparsed."""

    type: BreakpointType
    addr: int
    kind: int
    conditions: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoveBreakpoint(Request):
    """``z type,addr,kind``."""

    type: BreakpointType
    addr: int
    kind: int


# --- threads -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetThread(Request):
    """``H op thread-id``: ``op`` is ``g`` (registers, memory) or ``c`` (resumption)."""

    op: str
    thread: ThreadId


@dataclass(frozen=True, slots=True)
class ThreadAlive(Request):
    """``T thread-id``."""

    thread: ThreadId


@dataclass(frozen=True, slots=True)
class ThreadInfoFirst(Request):
    """``qfThreadInfo``."""


@dataclass(frozen=True, slots=True)
class ThreadInfoNext(Request):
    """``qsThreadInfo``."""


@dataclass(frozen=True, slots=True)
class CurrentThread(Request):
    """``qC``."""


@dataclass(frozen=True, slots=True)
class ThreadExtraInfo(Request):
    """``qThreadExtraInfo,thread-id``: reply is hex-encoded text."""

    thread: ThreadId


@dataclass(frozen=True, slots=True)
class ThreadsInfo(Request):
    """``jThreadsInfo`` (lldb): JSON description of every thread."""


# --- general queries and settings ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Supported(Request):
    """``qSupported[:feature;…]``; ``features`` maps a name to ``+``, ``-``, ``?``,
    its ``=value``, or ``""`` for a bare name (which gdbserver ignores too)."""

    features: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Attached(Request):
    """``qAttached[:pid]``: reply ``1`` (attached: detach on quit) or ``0``."""

    pid: int | None = None


@dataclass(frozen=True, slots=True)
class XferRead(Request):
    """``qXfer:object:read:annex:offset,length``."""

    object: str
    annex: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class HostInfo(Request):
    """``qHostInfo`` (lldb)."""


@dataclass(frozen=True, slots=True)
class ProcessInfo(Request):
    """``qProcessInfo`` (lldb)."""


@dataclass(frozen=True, slots=True)
class MemoryRegionInfo(Request):
    """``qMemoryRegionInfo:addr`` (lldb)."""

    addr: int


@dataclass(frozen=True, slots=True)
class WatchpointSupportInfo(Request):
    """``qWatchpointSupportInfo[:]`` (lldb): reply ``num:N;``."""


@dataclass(frozen=True, slots=True)
class RegisterInfo(Request):
    """``qRegisterInfo<hex n>`` (lldb, when target.xml is not used)."""

    regno: int


@dataclass(frozen=True, slots=True)
class ThreadSuffixSupported(Request):
    """``QThreadSuffixSupported`` (lldb): answering OK turns on ``;thread:`` suffixes."""


@dataclass(frozen=True, slots=True)
class ListThreadsInStopReply(Request):
    """``QListThreadsInStopReply`` (lldb): stop replies then carry ``threads:``."""


@dataclass(frozen=True, slots=True)
class EnableErrorStrings(Request):
    """``QEnableErrorStrings`` (lldb): errors may then carry ``;hex-text``."""


@dataclass(frozen=True, slots=True)
class StartNoAckMode(Request):
    """``QStartNoAckMode``: answering OK switches the connection to no-ack mode."""


@dataclass(frozen=True, slots=True)
class MustReplyEmpty(Request):
    """``vMustReplyEmpty``: a probe; the reply must be empty."""


@dataclass(frozen=True, slots=True)
class MonitorCommand(Request):
    """``qRcmd,hex``: the ``monitor`` command text, decoded."""

    command: str


@dataclass(frozen=True, slots=True)
class TraceStatus(Request):
    """``qTStatus``: tracepoint status (empty reply: no tracing)."""


@dataclass(frozen=True, slots=True)
class Offsets(Request):
    """``qOffsets``: section relocation offsets."""


@dataclass(frozen=True, slots=True)
class Symbol(Request):
    """``qSymbol::`` (ready to look up symbols: both None) or ``qSymbol:value:name``.

    ``value`` is None when gdb could not resolve ``name``.
    """

    value: int | None = None
    name: str | None = None


# --- ending the session --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detach(Request):
    """``D`` or ``D;pid``."""

    pid: int | None = None


@dataclass(frozen=True, slots=True)
class Kill(Request):
    """``k``: a VMI server treats it as detach (lldb -b sends it on exit)."""


@dataclass(frozen=True, slots=True)
class VKill(Request):
    """``vKill[;pid]``."""

    pid: int | None = None


# --- everything else -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unknown(Request):
    """A packet this stub does not implement: reply with an empty packet."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Malformed(Request):
    """A known packet with bad arguments: reply ``E..``.  ``reason`` is for logs."""

    payload: bytes
    reason: str
