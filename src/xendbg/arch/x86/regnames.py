"""Canonical register names shared by every backend and the engine.

One name set for 32- and 64-bit guests: a 32-bit guest's ``eax`` is the low
half of ``rax`` and ``r8``-``r15``/``xmm8``-``xmm15`` read as 0 there.  Values are
plain ints: ``st0``-``st7`` are the 80-bit x87 registers (FXSAVE layout, low 80
bits), ``xmm0``-``xmm15`` 128-bit, everything else at most 64-bit.
"""

from __future__ import annotations

GPRS64: tuple[str, ...] = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rbp",
    "rsp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
)
SEGMENTS: tuple[str, ...] = ("cs", "ss", "ds", "es", "fs", "gs")
SEGMENT_BASES: tuple[str, ...] = ("fs_base", "gs_base", "kernel_gs_base")
DESCRIPTOR_TABLES: tuple[str, ...] = (
    "gdtr_base",
    "gdtr_limit",
    "idtr_base",
    "idtr_limit",
    "ldtr",
    "tr",
)
CONTROL: tuple[str, ...] = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
DEBUG: tuple[str, ...] = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
X87: tuple[str, ...] = (
    *tuple(f"st{i}" for i in range(8)),
    "fctrl",
    "fstat",
    "ftag",
    "fiseg",
    "fioff",
    "foseg",
    "fooff",
    "fop",
)
SSE: tuple[str, ...] = (*tuple(f"xmm{i}" for i in range(16)), "mxcsr")

# Everything a backend may report; a backend without FPU state omits X87 and SSE.
BASE: tuple[str, ...] = (
    *GPRS64,
    "rip",
    "rflags",
    *SEGMENTS,
    *SEGMENT_BASES,
    *DESCRIPTOR_TABLES,
    *CONTROL,
    *DEBUG,
)
ALL: tuple[str, ...] = BASE + X87 + SSE
