"""Xen's binary layouts as ctypes structures, under Xen's own names.

Every layout here is checked against the C headers of libxen-dev by
``tests/test_xen_abi.py`` (a compiled ``offsetof``/``sizeof`` probe).  Layouts
that changed between Xen releases are declared once and parameterised, in the
manner of pyelftools' structs: ``vm_event_types(version)`` for the vm_event
interface (versions 3-7, Xen 4.11-4.20) and ``domaininfo_type(xen_version)``
for ``xen_domctl_getdomaininfo``.

Sources: xen/include/public/arch-x86/hvm/save.h, hvm/save.h, foreign/x86_32.h,
foreign/x86_64.h (the fixed-width twins of vcpu_guest_context), domctl.h,
vm_event.h and io/ring.h.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# ---------------------------------------------------------------------------
# HVM save records (hvm/save.h, arch-x86/hvm/save.h)

HVM_SAVE_CODE_END = 0  # DECLARE_HVM_SAVE_TYPE(END, 0, …)
HVM_SAVE_CODE_HEADER = 1
HVM_SAVE_CODE_CPU = 2
HVM_FILE_MAGIC = 0x54381286


class hvm_save_descriptor(ctypes.Structure):  # Xen's name
    _fields_ = [("typecode", u16), ("instance", u16), ("length", u32)]


class hvm_save_header(ctypes.Structure):
    _fields_ = [
        ("magic", u32),
        ("version", u32),
        ("changeset", u64),
        ("cpuid", u32),
        ("gtsc_khz", u32),
    ]


_HVM_GPRS: tuple[str, ...] = ("rax", "rbx", "rcx", "rdx", "rbp", "rsi", "rdi", "rsp")
_HVM_GPRS += tuple(f"r{i}" for i in range(8, 16))
_HVM_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")


class hvm_hw_cpu(ctypes.Structure):
    """HVM_SAVE_TYPE(CPU): one vCPU's architectural state (1032 bytes)."""

    _fields_ = [
        ("fpu_regs", u8 * 512),
        *[(n, u64) for n in _HVM_GPRS],
        ("rip", u64),
        ("rflags", u64),
        *[(f"cr{n}", u64) for n in (0, 2, 3, 4)],
        *[(f"dr{n}", u64) for n in (0, 1, 2, 3, 6, 7)],
        *[(f"{s}_sel", u32) for s in _HVM_SEGS],
        *[(f"{s}_limit", u32) for s in (*_HVM_SEGS, "idtr", "gdtr")],
        *[(f"{s}_base", u64) for s in (*_HVM_SEGS, "idtr", "gdtr")],
        *[(f"{s}_arbytes", u32) for s in _HVM_SEGS],
        ("sysenter_cs", u64),
        ("sysenter_esp", u64),
        ("sysenter_eip", u64),
        ("shadow_gs", u64),
        ("msr_flags", u64),
        ("msr_lstar", u64),
        ("msr_star", u64),
        ("msr_cstar", u64),
        ("msr_syscall_mask", u64),
        ("msr_efer", u64),
        ("msr_tsc_aux", u64),
        ("tsc", u64),
        ("pending_event", u32),  # union with the pending_* bitfields
        ("error_code", u32),
        ("flags", u32),
        ("pad0", u32),
    ]


# ---------------------------------------------------------------------------
# PV vCPU context (foreign/x86_64.h and foreign/x86_32.h)

_USER_REGS64 = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10",
    "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
)  # fmt: skip


class cpu_user_regs_x86_64(ctypes.Structure):
    _fields_ = [
        *[(n, u64) for n in _USER_REGS64],
        ("error_code", u32),
        ("entry_vector", u32),
        ("rip", u64),
        ("cs", u16),
        ("_pad0", u16 * 1),
        ("saved_upcall_mask", u8),
        ("_pad1", u8 * 3),
        ("rflags", u64),
        ("rsp", u64),
        *[
            (n, t)
            for s in ("ss", "es", "ds", "fs", "gs")
            for n, t in ((s, u16), (f"_p{s}", u16 * 3))
        ],
    ]


class trap_info_x86_64(ctypes.Structure):
    _fields_ = [("vector", u8), ("flags", u8), ("cs", u16), ("address", u64)]


class vcpu_guest_context_x86_64(ctypes.Structure):
    _fields_ = [
        ("fpu_ctxt", u8 * 512),
        ("flags", u64),
        ("user_regs", cpu_user_regs_x86_64),
        ("trap_ctxt", trap_info_x86_64 * 256),
        ("ldt_base", u64),
        ("ldt_ents", u64),
        ("gdt_frames", u64 * 16),
        ("gdt_ents", u64),
        ("kernel_ss", u64),
        ("kernel_sp", u64),
        ("ctrlreg", u64 * 8),
        ("debugreg", u64 * 8),
        ("event_callback_eip", u64),
        ("failsafe_callback_eip", u64),
        ("syscall_callback_eip", u64),
        ("vm_assist", u64),
        ("fs_base", u64),
        ("gs_base_kernel", u64),
        ("gs_base_user", u64),
    ]


class cpu_user_regs_x86_32(ctypes.Structure):
    _pack_ = 4  # foreign/x86_32.h: #pragma pack(4)
    _fields_ = [
        *[(n, u32) for n in ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax")],
        ("error_code", u16),
        ("entry_vector", u16),
        ("eip", u32),
        ("cs", u16),
        ("saved_upcall_mask", u8),
        ("_pad0", u8),
        ("eflags", u32),
        ("esp", u32),
        *[(n, t) for s in ("ss", "es", "ds", "fs", "gs") for n, t in ((s, u16), (f"_p{s}", u16))],
    ]


class trap_info_x86_32(ctypes.Structure):
    _pack_ = 4
    _fields_ = [("vector", u8), ("flags", u8), ("cs", u16), ("address", u32)]


class vcpu_guest_context_x86_32(ctypes.Structure):
    _pack_ = 4
    _fields_ = [
        ("fpu_ctxt", u8 * 512),
        ("flags", u32),
        ("user_regs", cpu_user_regs_x86_32),
        ("trap_ctxt", trap_info_x86_32 * 256),
        ("ldt_base", u32),
        ("ldt_ents", u32),
        ("gdt_frames", u32 * 16),
        ("gdt_ents", u32),
        ("kernel_ss", u32),
        ("kernel_sp", u32),
        ("ctrlreg", u32 * 8),
        ("debugreg", u32 * 8),
        ("event_callback_cs", u32),
        ("event_callback_eip", u32),
        ("failsafe_callback_cs", u32),
        ("failsafe_callback_eip", u32),
        ("vm_assist", u32),
    ]


class vcpu_guest_context_any(ctypes.Union):
    """xenctrl.h's vcpu_guest_context_any_t (``c``, the native one, is ``x64`` here)."""

    _fields_ = [("x64", vcpu_guest_context_x86_64), ("x32", vcpu_guest_context_x86_32)]


VGCF_I387_VALID = 1 << 0
VGCF_IN_KERNEL = 1 << 2
VGCF_ONLINE = 1 << 5

# ---------------------------------------------------------------------------
# Domain information (domctl.h: xen_domctl_getdomaininfo == xc_domaininfo_t)

XEN_DOMINF_dying = 1 << 0  # Xen's names
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_blocked = 1 << 4
XEN_DOMINF_running = 1 << 5
XEN_DOMINF_debugged = 1 << 6
XEN_DOMINF_xs_domain = 1 << 7
XEN_DOMINF_hap = 1 << 8
XEN_DOMINF_shutdownmask = 255
XEN_DOMINF_shutdownshift = 16

XEN_X86_EMU_LAPIC = 1 << 0
XEN_X86_EMU_PIC = 1 << 5


class xen_arch_domainconfig(ctypes.Structure):
    _fields_ = [("emulation_flags", u32), ("misc_flags", u32)]


@functools.cache
def domaininfo_type(xen_version: tuple[int, int] = (4, 17)) -> type[ctypes.Structure]:
    """``xen_domctl_getdomaininfo`` as the hypervisor ``xen_version`` lays it out.

    Xen 4.16 added ``gpaddr_bits`` and 7 bytes of padding before ``arch_config``;
    ``misc_flags`` came with 4.15.  Earlier fields never moved (4.11-4.20).
    """
    tail: list[tuple[str, type]] = []
    if xen_version >= (4, 16):
        tail = [("gpaddr_bits", u8), ("pad2", u8 * 7)]
    arch: type = xen_arch_domainconfig if xen_version >= (4, 15) else u32

    class xen_domctl_getdomaininfo(ctypes.Structure):
        _fields_ = [
            ("domain", u16),
            ("pad1", u16),
            ("flags", u32),
            ("tot_pages", u64),
            ("max_pages", u64),
            ("outstanding_pages", u64),
            ("shr_pages", u64),
            ("paged_pages", u64),
            ("shared_info_frame", u64),
            ("cpu_time", u64),
            ("nr_online_vcpus", u32),
            ("max_vcpu_id", u32),
            ("ssidref", u32),
            ("handle", u8 * 16),
            ("cpupool", u32),
            *tail,
            ("arch_config", arch),
        ]

    return xen_domctl_getdomaininfo


# ---------------------------------------------------------------------------
# Shared ring header (io/ring.h, DEFINE_RING_TYPES)


class vm_event_sring(ctypes.Structure):
    """The fixed part of ``struct vm_event_sring``; entries follow at ``ring``."""

    _fields_ = [
        ("req_prod", u32),
        ("req_event", u32),
        ("rsp_prod", u32),
        ("rsp_event", u32),
        ("pvt", u8 * 4),
        ("__pad", u8 * 44),
    ]


# ---------------------------------------------------------------------------
# vm_event (public/vm_event.h), parameterised by VM_EVENT_INTERFACE_VERSION

VM_EVENT_VERSIONS = (3, 4, 5, 6, 7)

# Which Xen release introduced each interface version (vm_event.h history).
VM_EVENT_VERSION_BY_XEN = {(4, 11): 3, (4, 12): 4, (4, 13): 5, (4, 14): 6}
VM_EVENT_LATEST = 7  # 4.15 and later, up to 4.20


class vm_event_x86_selector_reg(ctypes.Structure):
    _fields_ = [("limit", u32, 20), ("ar", u32, 12)]


class vm_event_mem_access(ctypes.Structure):
    _fields_ = [("gfn", u64), ("offset", u64), ("gla", u64), ("flags", u32), ("_pad", u32)]


class vm_event_write_ctrlreg(ctypes.Structure):
    _fields_ = [("index", u32), ("_pad", u32), ("new_value", u64), ("old_value", u64)]


class vm_event_singlestep(ctypes.Structure):
    _fields_ = [("gfn", u64)]


class vm_event_mov_to_msr(ctypes.Structure):
    _fields_ = [("msr", u64), ("new_value", u64), ("old_value", u64)]


class vm_event_cpuid(ctypes.Structure):
    _fields_ = [("insn_length", u32), ("leaf", u32), ("subleaf", u32), ("_pad", u32)]


class vm_event_interrupt_x86(ctypes.Structure):
    _fields_ = [
        ("vector", u32),
        ("type", u32),
        ("error_code", u32),
        ("_pad", u32),
        ("cr2", u64),
    ]


class vm_event_paging(ctypes.Structure):
    _fields_ = [("gfn", u64), ("p2mt", u32), ("flags", u32)]


@dataclass(frozen=True)
class VmEventTypes:
    """The ctypes classes of one vm_event interface version."""

    version: int
    regs_x86: type[ctypes.Structure]
    debug: type[ctypes.Structure]
    st: type[ctypes.Structure]  # vm_event_st == vm_event_request_t == vm_event_response_t

    @property
    def entry_size(self) -> int:
        return ctypes.sizeof(self.st)

    def ring_entries(self, page_size: int = PAGE_SIZE) -> int:
        """__RING_SIZE: entries that fit after the header, rounded down to a power of 2."""
        n = (page_size - ctypes.sizeof(vm_event_sring)) // self.entry_size
        return 1 << (n.bit_length() - 1) if n else 0


_REGS_GPRS: tuple[str, ...] = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
_REGS_GPRS += tuple(f"r{i}" for i in range(8, 16))
_REGS_MSRS = (
    "rip", "cr0", "cr2", "cr3", "cr4", "sysenter_cs", "sysenter_esp", "sysenter_eip",
    "msr_efer", "msr_star", "msr_lstar",
)  # fmt: skip
_SEL_REGS = ("cs", "ss", "ds", "es", "fs", "gs")


@functools.cache
def vm_event_types(version: int) -> VmEventTypes:
    """The layouts of vm_event interface ``version`` (3 … 7).

    History (git log -p xen/include/public/vm_event.h):
      3 (4.11)  mov_to_msr.old_value; regs_x86 = GPRs … fs_base, gs_base, cs_arbytes.
      4 (4.12)  regs_x86 gains dr6, segment bases/selectors/attributes, shadow_gs.
      5 (4.13)  regs_x86 gains gdtr_base and gdtr_limit.
      6 (4.14)  desc_access loses its SVM arm (same size); vm_event_debug gains
                pending_dbg (no version bump: the union ``u`` stays 32 bytes,
                the size of mem_access, in every version).
      7 (4.15+) regs_x86 gains npt_base (and vmtrace_pos, same release).
    """
    if version not in VM_EVENT_VERSIONS:
        raise ValueError(f"unknown vm_event interface version {version}")

    regs: list[tuple[str, type] | tuple[str, type, int]] = [(n, u64) for n in _REGS_GPRS]
    regs.append(("rflags", u64))
    if version >= 4:
        regs.append(("dr6", u64))
    regs += [("dr7", u64)] + [(n, u64) for n in _REGS_MSRS]
    if version == 3:
        regs += [("fs_base", u64), ("gs_base", u64), ("cs_arbytes", u32), ("_pad", u32)]
    else:
        if version >= 5:
            regs.append(("gdtr_base", u64))
        if version >= 7:
            regs += [("npt_base", u64), ("vmtrace_pos", u64)]
        regs += [(f"{s}_base", u32) for s in ("cs", "ss", "ds", "es")]
        regs += [("fs_base", u64), ("gs_base", u64)]
        regs += [(s, vm_event_x86_selector_reg) for s in _SEL_REGS]
        regs.append(("shadow_gs", u64))
        if version >= 5:
            regs.append(("gdtr_limit", u16))
        regs += [(f"{s}_sel", u16) for s in _SEL_REGS]
        regs.append(("_pad", u16 if version >= 5 else u32))

    class vm_event_regs_x86(ctypes.Structure):
        _fields_ = regs

    dbg: list[tuple[str, type]] = [("gfn", u64)]
    if version >= 6:
        dbg.append(("pending_dbg", u64))
    dbg += [("insn_length", u32), ("type", u8), ("_pad", u8 * 3)]

    class vm_event_debug(ctypes.Structure):
        _fields_ = dbg

    class vm_event_u(ctypes.Union):  # the anonymous union ``u``
        _fields_ = [
            ("mem_paging", vm_event_paging),
            ("mem_access", vm_event_mem_access),
            ("write_ctrlreg", vm_event_write_ctrlreg),
            ("mov_to_msr", vm_event_mov_to_msr),
            ("singlestep", vm_event_singlestep),
            ("software_breakpoint", vm_event_debug),
            ("debug_exception", vm_event_debug),
            ("cpuid", vm_event_cpuid),
            ("interrupt", vm_event_interrupt_x86),
        ]

    class vm_event_regs(ctypes.Union):
        _fields_ = [("x86", vm_event_regs_x86)]

    class vm_event_data(ctypes.Union):
        _fields_ = [("regs", vm_event_regs)]

    class vm_event_st(ctypes.Structure):
        _fields_ = [
            ("version", u32),
            ("flags", u32),
            ("reason", u32),
            ("vcpu_id", u32),
            ("altp2m_idx", u16),
            ("_pad", u16 * 3),
            ("u", vm_event_u),
            ("data", vm_event_data),
        ]

    return VmEventTypes(version, vm_event_regs_x86, vm_event_debug, vm_event_st)
