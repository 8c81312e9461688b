"""x86 disassembly with capstone (Intel syntax), including a window around the PC.

x86 cannot be decoded backwards, so the instructions before the PC are found by
decoding forward from a few candidate starts (the enclosing symbol first) and
keeping one whose instruction boundaries land exactly on the PC.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

BRANCH_MNEMONICS = ("call", "jmp", "loop", "jrcxz", "jecxz")
MASK64 = (1 << 64) - 1
_MEMORY = re.compile(r"\[([^\]]*)\]")
_DISP = re.compile(r"(?:^|\s([-+])\s)(0x[0-9a-f]+)$")


@dataclass(frozen=True, slots=True)
class Insn:
    addr: int
    size: int
    raw: bytes
    mnemonic: str
    op_str: str

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".rstrip()

    @property
    def end(self) -> int:
        return self.addr + self.size

    def branch_target(self) -> int | None:
        """The immediate target of a direct call/jmp/jcc, else None."""
        m = self.mnemonic
        if not (m.startswith("j") or m in BRANCH_MNEMONICS):
            return None
        try:
            return int(self.op_str, 16)
        except ValueError:
            return None

    def memory_ref(self) -> int | None:
        """The address a memory operand's displacement names: RIP-relative targets,
        and absolute displacements such as ``[rbx*8 - 0x7fef1fe0]`` (an array base)."""
        m = _MEMORY.search(self.op_str)
        if m is None:
            return None
        inner = m.group(1)
        d = _DISP.search(inner)
        if d is None:
            return None
        disp = int(d.group(2), 16) * (-1 if d.group(1) == "-" else 1)
        if inner.startswith("rip") or inner.startswith("eip"):
            return (self.end + disp) & MASK64
        if d.group(1) is None and not inner.startswith("0x"):
            return None  # a bare number next to registers would be a scale, not a base
        return disp & MASK64

    @property
    def is_call(self) -> bool:
        return self.mnemonic == "call"


@functools.cache
def _capstone(bits: int) -> Any:
    import capstone

    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    return capstone.Cs(capstone.CS_ARCH_X86, mode)


def disassemble(code: bytes, addr: int, bits: int, count: int = 0) -> list[Insn]:
    """Decode ``code`` located at ``addr``; stops at the first undecodable byte.
    ``count`` = 0 decodes as much as possible."""
    return [
        Insn(i.address, i.size, bytes(i.bytes), i.mnemonic, i.op_str)
        for i in _capstone(bits).disasm(code, addr, count)
    ]


def decode_one(code: bytes, addr: int, bits: int) -> Insn | None:
    got = disassemble(code, addr, bits, 1)
    return got[0] if got else None


ReadFn = Callable[[int, int], bytes]  # (addr, size) -> as many leading bytes as readable


def window(
    read: ReadFn, pc: int, bits: int, before: int, after: int, starts: Iterable[int] = ()
) -> list[Insn]:
    """About ``before`` instructions before ``pc`` and ``after`` from it (pc included)."""
    lookback = 16 * before
    candidates = [s for s in starts if pc - lookback <= s <= pc]
    candidates += [pc - d for d in range(lookback, 0, -1)]
    lo = max(0, pc - lookback)
    head = read(lo, pc - lo) if pc > lo else b""
    if len(head) < pc - lo and lo < pc & ~0xFFF:
        # The page before the PC's is not mapped: look back within this page only.
        lo = pc & ~0xFFF
        head = read(lo, pc - lo) if pc > lo else b""
    prefix: list[Insn] = []
    for start in candidates:
        if start < lo:
            continue
        insns = disassemble(head[start - lo :], start, bits)
        if insns and insns[-1].end == pc:
            prefix = insns[-before:] if before else []
            break
    tail_code = read(pc, 16 * after)
    return prefix + disassemble(tail_code, pc, bits, after)
