"""Register names as a user types them: canonical names, GDB names and sub-registers.

The engine speaks canonical names (``rax``, ``rflags`` …, see
:mod:`xendbg.arch.x86.regnames`).  A user also expects ``$eax``, ``$ax``, ``$al``,
``$ah``, ``$r8d``, ``$eip``, ``$eflags`` and GDB's ``$pc``/``$sp``/``$fp``; each is
a bit field of one canonical register, which is what this module resolves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xendbg.arch.x86 import registers as x86regs
from xendbg.arch.x86.regnames import GPRS64


@dataclass(frozen=True, slots=True)
class Field:
    """``bits`` bits of canonical register ``source`` starting at bit ``shift``."""

    source: str
    shift: int
    bits: int

    @property
    def mask(self) -> int:
        return ((1 << self.bits) - 1) << self.shift

    def read(self, value: int) -> int:
        return (value >> self.shift) & ((1 << self.bits) - 1)

    def merge(self, old: int, value: int) -> int:
        return (old & ~self.mask) | ((value << self.shift) & self.mask)


_LEGACY = ("a", "b", "c", "d")  # rax rbx rcx rdx: eax/ax/al/ah
_INDEX = ("si", "di", "bp", "sp")  # rsi rdi rbp rsp: esi/si/sil


def _aliases(word_size: int) -> dict[str, Field]:
    width = word_size * 8
    out: dict[str, Field] = {}
    for r in _LEGACY:
        src = f"r{r}x"
        out[f"e{r}x"] = Field(src, 0, 32)
        out[f"{r}x"] = Field(src, 0, 16)
        out[f"{r}l"] = Field(src, 0, 8)
        out[f"{r}h"] = Field(src, 8, 8)
    for r in _INDEX:
        src = f"r{r}"
        out[f"e{r}"] = Field(src, 0, 32)
        out[r] = Field(src, 0, 16)
        out[f"{r}l"] = Field(src, 0, 8)
    if word_size == 8:
        for n in range(8, 16):
            out[f"r{n}d"] = Field(f"r{n}", 0, 32)
            out[f"r{n}w"] = Field(f"r{n}", 0, 16)
            out[f"r{n}b"] = Field(f"r{n}", 0, 8)
            out[f"r{n}l"] = Field(f"r{n}", 0, 8)
    out["eip"] = Field("rip", 0, 32)
    out["ip"] = Field("rip", 0, 16)
    out["eflags"] = Field("rflags", 0, 32)
    # GDB's architecture-neutral names.  "sp" is both GDB's stack pointer and
    # the 16-bit SP; GDB gives $sp the full width, so do we.
    out["pc"] = Field("rip", 0, width)
    out["sp"] = Field("rsp", 0, width)
    out["fp"] = Field("rbp", 0, width)
    out["ps"] = Field("rflags", 0, 32)
    return out


class RegisterNames:
    """Resolves user register names for a guest of ``word_size`` bytes."""

    def __init__(self, word_size: int, canonical: frozenset[str]) -> None:
        self.word_size = word_size
        self.layout = x86regs.layout(word_size, fpu=False)
        self.fields: dict[str, Field] = {}
        for name in canonical:
            self.fields[name] = Field(
                name, 0, 128 if name.startswith("xmm") else 80 if name.startswith("st") else 64
            )
        for desc in self.layout:
            if desc.source in canonical:
                self.fields.setdefault(desc.name, Field(desc.source, 0, desc.bitsize))
        for alias, f in _aliases(word_size).items():
            if f.source in canonical:
                self.fields[alias] = f

    def names(self) -> list[str]:
        return sorted(self.fields)

    def field(self, name: str) -> Field | None:
        return self.fields.get(name.lower())

    def read(self, regs: Mapping[str, int], name: str) -> int | None:
        f = self.field(name)
        if f is None or f.source not in regs:
            return None
        return f.read(regs[f.source])

    def update(self, regs: Mapping[str, int], name: str, value: int) -> dict[str, int]:
        """The canonical write that sets ``name`` to ``value`` (other bits kept)."""
        f = self.field(name)
        if f is None:
            raise KeyError(name)
        return {f.source: f.merge(regs.get(f.source, 0), value)}

    def display_name(self, source: str) -> str:
        """How the register view labels canonical ``source`` (``eax`` on i386)."""
        try:
            return self.layout.gdb_name(source)
        except KeyError:
            return source

    def general(self) -> list[str]:
        """Canonical names of the general view: GPRs, pointer, flags, segments, CRs."""
        gprs = (
            GPRS64
            if self.word_size == 8
            else ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
        )
        return [
            *gprs,
            "rip",
            "rflags",
            "cs",
            "ss",
            "ds",
            "es",
            "fs",
            "gs",
            "fs_base",
            "gs_base",
            "cr0",
            "cr2",
            "cr3",
            "cr4",
            "efer",
        ]


RFLAGS_BITS = (
    (0, "CF"),
    (2, "PF"),
    (4, "AF"),
    (6, "ZF"),
    (7, "SF"),
    (8, "TF"),
    (9, "IF"),
    (10, "DF"),
    (11, "OF"),
)


def flag_names(rflags: int) -> str:
    """``[ ZF PF IF ]`` like GDB's eflags display."""
    return "[ " + " ".join(n for bit, n in RFLAGS_BITS if rflags >> bit & 1) + " ]"
