"""Software single-step: every address execution can reach after one instruction.

Where the hypervisor offers no single-step (no MTF, no #DB events: a Xen PV
guest), the engine steps by decoding the instruction at RIP and parking a
``jmp $`` on each possible successor (see ``spin``).  This module is the
decoding half, and pure: the caller hands in the instruction bytes (the
guest's own, breakpoints hidden), the vCPU's registers and a reader of guest
memory through that vCPU's page tables.

Successors (Intel SDM vol. 2, each instruction's "Operation"):

* anything that is not control flow: the fall-through (``hlt`` included: it
  resumes after itself; ``vmcall``/``vmmcall``: the hypervisor returns there);
* ``jmp``/``call`` direct: the target only (a call's step ends at the callee);
  indirect through a register or memory: the target read now (ModRM
  base + index*scale + disp, RIP-relative, FS/GS bases; other segment bases are
  taken as 0, the flat model every 32- and 64-bit kernel uses);
* ``jcc``, ``loop*``, ``jcxz``/``jecxz``/``jrcxz``, ``xbegin``: target and
  fall-through (both are parked; whichever is reached ends the step);
* ``ret``/``ret imm16``: the return address at [RSP] (ESP for 32-bit code);
* ``rep``-prefixed string instructions: the instruction itself (one iteration
  done, RCX decremented) and the fall-through.  The engine cannot park on the
  instruction it is executing, so such a step runs until the last iteration.

Far transfers, interrupts, exceptions and privilege changes (``int``,
``int3``, ``into``, ``iret``, ``syscall``/``sysret``, ``sysenter``/``sysexit``,
far ``jmp``/``call``/``ret``, ``ud2``, VMX/SVM entry) change CS, the stack or
the mode: their successor is not knowable from here, and Unsupported is raised
rather than a guess.  Nor can a step catch a fault raised *by* an ordinary
instruction (a #PF on its operand runs the guest's handler, which no parked
successor sees): such a step ends when the engine's step timeout does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs, CsInsn
from capstone import x86_const as X

from xendbg.errors import GuestMemoryFault, Unsupported, XendbgError

# (linear address, size) -> bytes, through the stepping vCPU's page tables.
ReadFn = Callable[[int, int], bytes]

MAX_INSN_LENGTH = 15  # SDM vol. 2, 2.3.11
CR0_PE = 1 << 0
EFER_LMA = 1 << 10
DESC_L = 1 << 53  # code segment descriptor: 64-bit code
DESC_DB = 1 << 54  # code segment descriptor: default operand size 32

_OP = "software single-step"

_CONDITIONAL = frozenset(
    {
        X.X86_INS_JA,
        X.X86_INS_JAE,
        X.X86_INS_JB,
        X.X86_INS_JBE,
        X.X86_INS_JE,
        X.X86_INS_JNE,
        X.X86_INS_JG,
        X.X86_INS_JGE,
        X.X86_INS_JL,
        X.X86_INS_JLE,
        X.X86_INS_JO,
        X.X86_INS_JNO,
        X.X86_INS_JP,
        X.X86_INS_JNP,
        X.X86_INS_JS,
        X.X86_INS_JNS,
        X.X86_INS_JCXZ,
        X.X86_INS_JECXZ,
        X.X86_INS_JRCXZ,
        X.X86_INS_LOOP,
        X.X86_INS_LOOPE,
        X.X86_INS_LOOPNE,
        X.X86_INS_XBEGIN,
    }
)
_UNSUPPORTED = {
    X.X86_INS_INT: "a software interrupt enters the guest's IDT handler",
    X.X86_INS_INT1: "int1 raises #DB into the guest's handler",
    X.X86_INS_INT3: "int3 raises #BP into the guest's handler",
    X.X86_INS_INTO: "into may raise #OF into the guest's handler",
    X.X86_INS_UD0: "the instruction raises #UD",
    X.X86_INS_UD1: "the instruction raises #UD",
    X.X86_INS_UD2: "the instruction raises #UD",
    X.X86_INS_IRET: "iret loads CS:IP and flags from the stack (privilege and mode may change)",
    X.X86_INS_IRETD: "iret loads CS:EIP and flags from the stack (privilege and mode may change)",
    X.X86_INS_IRETQ: "iretq loads CS:RIP, RFLAGS and SS:RSP (privilege and mode may change)",
    X.X86_INS_SYSCALL: "syscall enters the kernel at MSR_LSTAR (or Xen, for a PV guest)",
    X.X86_INS_SYSRET: "sysret changes privilege level",
    X.X86_INS_SYSRETQ: "sysret changes privilege level",
    X.X86_INS_SYSENTER: "sysenter enters the kernel at MSR_SYSENTER_EIP",
    X.X86_INS_SYSEXIT: "sysexit changes privilege level",
    X.X86_INS_SYSEXITQ: "sysexit changes privilege level",
    X.X86_INS_LJMP: "a far jump loads CS",
    X.X86_INS_LCALL: "a far call loads CS",
    X.X86_INS_RETF: "a far return loads CS",
    X.X86_INS_RETFQ: "a far return loads CS",
    X.X86_INS_RSM: "rsm leaves system-management mode",
    X.X86_INS_VMLAUNCH: "VM entry runs a nested guest",
    X.X86_INS_VMRESUME: "VM entry runs a nested guest",
    X.X86_INS_VMRUN: "VM entry runs a nested guest",
}
# One-byte string opcodes (SDM vol. 2, "REP/REPE/REPZ/REPNE/REPNZ").
_STRING_OPCODES = frozenset({0x6C, 0x6D, 0x6E, 0x6F, 0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB})
_STRING_OPCODES |= frozenset({0xAC, 0xAD, 0xAE, 0xAF})
_REP_PREFIXES = frozenset({0xF2, 0xF3})
_CONTROL_GROUPS = frozenset(
    {X.X86_GRP_JUMP, X.X86_GRP_CALL, X.X86_GRP_RET, X.X86_GRP_INT, X.X86_GRP_IRET}
)
_SEGMENT_BASES = {X.X86_REG_FS: "fs_base", X.X86_REG_GS: "gs_base"}
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")


def _decoder(bits: int) -> Cs:
    cs = Cs(CS_ARCH_X86, CS_MODE_64 if bits == 64 else CS_MODE_32)
    cs.detail = True
    return cs


_DECODERS = {64: _decoder(64), 32: _decoder(32)}


@dataclass(frozen=True, slots=True)
class Successors:
    """Where the vCPU can be after executing the instruction at ``addr`` once."""

    addr: int
    length: int
    text: str  # the instruction, for messages
    targets: frozenset[int]  # may contain ``addr`` itself (rep string, branch to self)

    @property
    def fall_through(self) -> int:
        return self.addr + self.length


def register_value(name: str, regs: Mapping[str, int]) -> int:
    """The value of capstone's register ``name`` (``eax``, ``r9d``, ``sp`` …) from
    canonical 64-bit registers (a 32-bit guest's ``eax`` is the low half of ``rax``)."""
    if name in ("rip", "eip", "ip"):
        width = {"rip": 64, "eip": 32, "ip": 16}[name]
        return regs["rip"] & ((1 << width) - 1)
    if name in ("riz", "eiz"):  # the "no index" pseudo-register of some encodings
        return 0
    if name in regs and name in (*_GPR64, *(f"r{i}" for i in range(8, 16))):
        return regs[name]
    if name.startswith("r") and name[-1] in "dwb" and name[1:-1].isdigit():
        width = {"d": 32, "w": 16, "b": 8}[name[-1]]
        return regs[name[:-1]] & ((1 << width) - 1)
    if len(name) == 3 and name.startswith("e") and "r" + name[1:] in _GPR64:
        return regs["r" + name[1:]] & 0xFFFFFFFF
    if len(name) == 2 and "r" + name in _GPR64:
        return regs["r" + name] & 0xFFFF
    raise XendbgError(f"register {name} cannot hold an address")


def code_bits(regs: Mapping[str, int], word_size: int, read: ReadFn | None = None) -> int:
    """64 or 32: the code size the vCPU executes in (SDM vol. 3A 5.2.1).

    CS's descriptor is read from the GDT when ``read`` and GDTR are available
    (so 32-bit compatibility-mode code under a 64-bit kernel is told apart);
    otherwise EFER.LMA decides (PV contexts carry no GDTR).
    """
    if "cr0" in regs and not regs["cr0"] & CR0_PE:
        raise Unsupported(_OP, "the vCPU is in real mode (16-bit code)")
    lma = bool(regs["efer"] & EFER_LMA) if "efer" in regs else word_size == 8
    bits = 64 if lma else 32
    sel = regs.get("cs", 0)
    if read is None or "gdtr_base" not in regs or sel & 4 or sel < 8:
        return bits
    if (sel | 7) > regs.get("gdtr_limit", 0):
        return bits
    try:
        desc = int.from_bytes(read(regs["gdtr_base"] + (sel & ~7), 8), "little")
    except GuestMemoryFault:
        return bits
    if lma and desc & DESC_L:
        return 64
    if desc & DESC_DB:
        return 32
    raise Unsupported(_OP, "the vCPU executes 16-bit code")


def decode(code: bytes, addr: int, bits: int) -> CsInsn:
    """The instruction at ``addr``; Unsupported if ``code`` does not start with one."""
    insn = next(_DECODERS[bits].disasm(code[:MAX_INSN_LENGTH], addr, 1), None)
    if insn is None:
        raise Unsupported(_OP, f"no valid {bits}-bit instruction at {addr:#x}: {code[:8].hex()}")
    return insn


def instruction_length(code: bytes, addr: int, bits: int) -> int:
    return int(decode(code, addr, bits).size)


def successors(
    code: bytes, addr: int, bits: int, regs: Mapping[str, int], read: ReadFn
) -> Successors:
    """Every address execution can continue at after the instruction at ``addr``.

    ``code`` holds the instruction's bytes (up to 15), ``regs`` the vCPU's
    registers before it executes, ``read`` reads guest-linear memory (the
    return address of a ``ret``, the pointer of an indirect ``jmp``/``call``).
    """
    insn = decode(code, addr, bits)
    mask = (1 << bits) - 1
    fall = (addr + insn.size) & mask
    text = f"{insn.mnemonic} {insn.op_str}".rstrip()
    iid = insn.id

    def result(*targets: int) -> Successors:
        return Successors(addr, insn.size, text, frozenset(t & mask for t in targets))

    why = _UNSUPPORTED.get(iid)
    if why is not None:
        raise Unsupported(_OP, f"`{text}` at {addr:#x}: {why}")
    if iid in _CONDITIONAL:
        return result(insn.operands[0].imm, fall)
    if iid in (X.X86_INS_JMP, X.X86_INS_CALL):
        if _is_far_indirect(insn):
            raise Unsupported(_OP, f"`{text}` at {addr:#x}: a far transfer loads CS")
        return result(_operand_target(insn, bits, regs, read))
    if iid == X.X86_INS_RET:
        size = bits // 8
        return result(int.from_bytes(read(regs["rsp"] & mask, size), "little"))
    if _is_rep_string(insn):
        return result(addr, fall)
    if _CONTROL_GROUPS.intersection(insn.groups) and iid not in (
        X.X86_INS_VMCALL,
        X.X86_INS_VMMCALL,
    ):
        raise Unsupported(_OP, f"`{text}` at {addr:#x}: this control transfer is not modelled")
    return result(fall)


def _is_far_indirect(insn: CsInsn) -> bool:
    """FF /3 (call m16:xx) and FF /5 (jmp m16:xx), which capstone names call/jmp."""
    return insn.opcode[0] == 0xFF and (insn.modrm >> 3) & 7 in (3, 5)


def _is_rep_string(insn: CsInsn) -> bool:
    opcode = bytes(insn.opcode).rstrip(b"\0")
    return len(opcode) == 1 and opcode[0] in _STRING_OPCODES and insn.prefix[0] in _REP_PREFIXES


def _operand_target(insn: CsInsn, bits: int, regs: Mapping[str, int], read: ReadFn) -> int:
    """Destination of a near jmp/call: immediate, register or memory operand."""
    op = insn.operands[0]
    width_mask = (1 << (8 * op.size)) - 1 if op.size else (1 << bits) - 1
    if op.type == X.X86_OP_IMM:
        return int(op.imm)
    if op.type == X.X86_OP_REG:
        return register_value(insn.reg_name(op.reg), regs) & width_mask
    if op.type == X.X86_OP_MEM:
        ea = effective_address(insn, op, regs, bits)
        return int.from_bytes(read(ea, op.size), "little") & width_mask
    raise Unsupported(_OP, f"operand of `{insn.mnemonic} {insn.op_str}` not understood")


def effective_address(insn: CsInsn, op: object, regs: Mapping[str, int], bits: int) -> int:
    """Linear address of memory operand ``op``: segment base + base + index*scale + disp,
    wrapped to the instruction's address size (SDM vol. 1, 3.7.5)."""
    mem = op.mem  # type: ignore[attr-defined]
    next_ip = insn.address + insn.size
    ea = int(mem.disp)
    if mem.base != 0:
        name = insn.reg_name(mem.base)
        ea += next_ip if name in ("rip", "eip") else register_value(name, regs)
    if mem.index != 0:
        ea += register_value(insn.reg_name(mem.index), regs) * int(mem.scale)
    ea &= (1 << (8 * int(insn.addr_size))) - 1
    seg = _SEGMENT_BASES.get(mem.segment)
    if seg is not None:
        ea += regs.get(seg, 0)
    return ea & ((1 << bits) - 1)
