"""Exception and interrupt delivery through the guest IDT (Intel SDM vol. 3A 6.12).

Unicorn reports every exception to a UC_HOOK_INTR callback instead of
delivering it, so the backend delivers the ones the guest should see (an
unmonitored int3, a re-injected #DB, a #PF, ``inject_trap``) itself: read the
gate, pick the stack, push the frame, load CS:RIP and mask RFLAGS.

Modelled: IA-32e 64-bit interrupt/trap gates (IST and the RSP0 stack switch
on a privilege change) and 32-bit protected-mode interrupt/trap gates (SS0:ESP0
switch).  Not modelled: task gates, 16-bit gates, real mode, the gate's DPL
check for software interrupts, nested faults during delivery — any delivery
failure is reported as a triple fault, which the caller turns into a crashed vCPU.
"""

from __future__ import annotations

import struct

from xendbg.backend.emu.linear import LinearMemory
from xendbg.backend.emu.regs import RegisterFile
from xendbg.errors import GuestMemoryFault

# Vectors that push an error code (SDM table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17

_GATE_INTERRUPT = 0xE
_GATE_TRAP = 0xF
_TSS64_RSP0 = 0x04
_TSS64_IST1 = 0x24
_TSS32_ESP0 = 0x04
_TSS32_SS0 = 0x08


class TripleFault(Exception):
    """The exception could not be delivered (the CPU would shut down)."""


def deliver(
    regs: RegisterFile,
    mem: LinearMemory,
    vector: int,
    error_code: int | None = None,
    *,
    set_rf: bool = False,
) -> None:
    """Deliver ``vector`` to the vCPU as the CPU would, from its current state.

    The pushed RIP is the current RIP (the caller has already placed it: on the
    faulting instruction for faults, after it for traps and ``int n``).
    ``set_rf`` sets RF in the pushed RFLAGS, as the CPU does for fault-class
    debug exceptions so that IRET does not re-trigger an instruction breakpoint.
    """
    if not 0 <= vector <= 255:
        raise ValueError(f"vector {vector} outside 0..255")
    if error_code is None and vector in ERROR_CODE_VECTORS:
        error_code = 0
    try:
        if regs.word_size == 8:
            _deliver64(regs, mem, vector, error_code, set_rf)
        else:
            _deliver32(regs, mem, vector, error_code, set_rf)
    except GuestMemoryFault as e:
        raise TripleFault(f"vector {vector}: {e}") from e


def _idt_gate(regs: RegisterFile, mem: LinearMemory, vector: int, size: int) -> bytes:
    _, base, limit, _ = regs.mmr("idtr")
    if vector * size + size - 1 > limit:
        raise TripleFault(
            f"vector {vector} lies beyond the IDT limit {limit:#x} (IDT base {base:#x})"
        )
    return mem.read(base + vector * size, size)


def _deliver64(
    regs: RegisterFile, mem: LinearMemory, vector: int, error_code: int | None, set_rf: bool
) -> None:
    state = regs.read_all()
    lo, hi = struct.unpack("<QQ", _idt_gate(regs, mem, vector, 16))
    gate_type = (lo >> 40) & 0xF
    if not (lo >> 47) & 1 or gate_type not in (_GATE_INTERRUPT, _GATE_TRAP):
        raise TripleFault(f"vector {vector}: IDT gate not present or not an interrupt/trap gate")
    target = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFFFFFF) << 32
    selector = (lo >> 16) & 0xFFFF
    ist = (lo >> 32) & 7
    cpl, new_cpl = state["cs"] & 3, selector & 3
    rsp = state["rsp"]
    if ist:
        rsp = struct.unpack("<Q", mem.read(regs.mmr("tr")[1] + _TSS64_IST1 + 8 * (ist - 1), 8))[0]
    elif new_cpl < cpl:
        rsp = struct.unpack("<Q", mem.read(regs.mmr("tr")[1] + _TSS64_RSP0, 8))[0]
    rsp &= ~0xF
    rflags = state["rflags"] | (RFLAGS_RF if set_rf else 0)
    frame = [state["rip"], state["cs"], rflags, state["rsp"], state["ss"]]
    if error_code is not None:
        frame.insert(0, error_code)
    rsp -= 8 * len(frame)
    mem.write(rsp, struct.pack(f"<{len(frame)}Q", *frame))
    new_flags = state["rflags"] & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate_type == _GATE_INTERRUPT:
        new_flags &= ~RFLAGS_IF
    values = {"rsp": rsp, "rip": target, "rflags": new_flags, "cs": selector}
    if new_cpl < cpl:
        values["ss"] = 0
    regs.write(values)


def _deliver32(
    regs: RegisterFile, mem: LinearMemory, vector: int, error_code: int | None, set_rf: bool
) -> None:
    state = regs.read_all()
    lo, hi = struct.unpack("<II", _idt_gate(regs, mem, vector, 8))
    gate_type = (hi >> 8) & 0xF
    if not (hi >> 15) & 1 or gate_type not in (_GATE_INTERRUPT, _GATE_TRAP):
        raise TripleFault(f"vector {vector}: IDT gate not present or not a 32-bit gate")
    target = (lo & 0xFFFF) | (hi & 0xFFFF0000)
    selector = lo >> 16
    cpl, new_cpl = state["cs"] & 3, selector & 3
    esp, ss = state["rsp"], state["ss"]
    frame = [state["rip"], state["cs"], state["rflags"] | (RFLAGS_RF if set_rf else 0)]
    values: dict[str, int] = {}
    if new_cpl < cpl:
        tss = regs.mmr("tr")[1]
        esp = struct.unpack("<I", mem.read(tss + _TSS32_ESP0, 4))[0]
        values["ss"] = struct.unpack("<H", mem.read(tss + _TSS32_SS0, 2))[0]
        frame += [state["rsp"], ss]
    if error_code is not None:
        frame.insert(0, error_code)
    esp = (esp - 4 * len(frame)) & 0xFFFFFFFF
    mem.write(esp, struct.pack(f"<{len(frame)}I", *(v & 0xFFFFFFFF for v in frame)))
    new_flags = state["rflags"] & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate_type == _GATE_INTERRUPT:
        new_flags &= ~RFLAGS_IF
    values.update({"rsp": esp, "rip": target, "rflags": new_flags, "cs": selector})
    regs.write(values)
