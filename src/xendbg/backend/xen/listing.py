"""Listing Xen domains: id, name, type, width, vCPUs, memory, state.

The classification rules are pure functions over ``xen_domctl_getdomaininfo``
fields, so they are tested on fabricated structures:

* type: no ``XEN_DOMINF_hvm_guest`` → PV.  Xen has no PVH flag: a PVH domain
  is an HVM container without emulated legacy devices.  Xen 4.17 accepts
  only two emulation sets for an HVM domU (emulation_flags_ok(),
  xen/arch/x86/domain.c): all devices but vPCI (HVM) or the local APIC alone
  (PVH), and a PVH dom0 has LAPIC|IOAPIC|VPCI, so "HVM without an emulated
  PIC" is PVH.  libxl records the same answer in xenstore
  (/libxl/<domid>/type) only for the domains it built.
* width: PV guests have a fixed address size (``xc_domain_get_guest_width``);
  an HVM/PVH guest's width is its vCPU 0 mode (EFER.LMA).
* state: the letters of ``xl list`` folded into one word, most telling first.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from xendbg.backend.base import GuestType
from xendbg.backend.xen import structs
from xendbg.backend.xen.context import EFER_LMA
from xendbg.backend.xen.xenctrl import XenCtrl
from xendbg.backend.xen.xenstore import XenStore
from xendbg.errors import BackendError, DomainGone, XendbgError

SHUTDOWN_crash = 3  # sched.h: SHUTDOWN_* codes in the XEN_DOMINF_shutdown field


@dataclass(frozen=True, slots=True)
class DomainInfo:
    domid: int
    name: str
    guest_type: GuestType
    word_size: int | None  # None when it cannot be read (e.g. vCPU 0 not up yet)
    vcpus: int  # online vCPUs
    max_vcpus: int  # max_vcpu_id + 1
    memory_kib: int
    state: str


def emulation_flags(info: Any) -> int:
    """arch_config.emulation_flags (a bare u32 before Xen 4.15)."""
    arch = info.arch_config
    return int(arch if isinstance(arch, int) else arch.emulation_flags)


def guest_type_of(flags: int, emulation: int) -> GuestType:
    if not flags & structs.XEN_DOMINF_hvm_guest:
        return GuestType.PV
    return GuestType.HVM if emulation & structs.XEN_X86_EMU_PIC else GuestType.PVH


def state_of(flags: int) -> str:
    if flags & structs.XEN_DOMINF_dying:
        return "dying"
    if flags & structs.XEN_DOMINF_shutdown:
        code = (flags >> structs.XEN_DOMINF_shutdownshift) & structs.XEN_DOMINF_shutdownmask
        return "crashed" if code == SHUTDOWN_crash else "shutdown"
    if flags & structs.XEN_DOMINF_paused:
        return "paused"
    if flags & structs.XEN_DOMINF_running:
        return "running"
    if flags & structs.XEN_DOMINF_blocked:
        return "blocked"
    return "idle"


def hvm_word_size(efer: int) -> int:
    return 8 if efer & EFER_LMA else 4


def domain_name(xs: XenStore | None, domid: int) -> str:
    name = xs.read(f"/local/domain/{domid}/name") if xs is not None else None
    return name if name else ("Domain-0" if domid == 0 else "")


def word_size_of(xc: XenCtrl, domid: int, guest_type: GuestType) -> int | None:
    try:
        if guest_type is GuestType.PV:
            return xc.guest_width(domid)
        raw = xc.hvm_getcontext_partial(
            domid, structs.HVM_SAVE_CODE_CPU, 0, ctypes.sizeof(structs.hvm_hw_cpu)
        )
        return hvm_word_size(structs.hvm_hw_cpu.from_buffer_copy(raw).msr_efer)
    except BackendError:
        return None


def describe(xc: XenCtrl, xs: XenStore | None, info: Any) -> DomainInfo:
    """A DomainInfo from one ``xen_domctl_getdomaininfo`` (plus xenstore, width)."""
    domid = int(info.domain)
    flags = int(info.flags)
    gtype = guest_type_of(flags, emulation_flags(info))
    return DomainInfo(
        domid=domid,
        name=domain_name(xs, domid),
        guest_type=gtype,
        word_size=word_size_of(xc, domid, gtype),
        vcpus=int(info.nr_online_vcpus),
        max_vcpus=int(info.max_vcpu_id) + 1,
        memory_kib=int(info.tot_pages) * (structs.PAGE_SIZE // 1024),
        state=state_of(flags),
    )


def list_domains(xc: XenCtrl, xs: XenStore | None) -> list[DomainInfo]:
    """Every domain, by increasing id."""
    version = xc.version()
    out = []
    first = 0
    while (info := xc.domain_info_from(first, version)) is not None:
        out.append(describe(xc, xs, info))
        first = int(info.domain) + 1
    return out


def domain_info(xc: XenCtrl, domid: int) -> Any:
    """The raw information of exactly ``domid``; DomainGone if it does not exist."""
    info = xc.domain_info_from(domid, xc.version())
    if info is None or int(info.domain) != domid:
        raise DomainGone("xc_domain_getinfolist", 3, f"no domain {domid}")
    return info


def resolve(xc: XenCtrl, xs: XenStore | None, target: str | int) -> int:
    """A domain id from an id or a name (names are unique in xenstore)."""
    if isinstance(target, int) or target.isdigit():
        domid = int(target)
        domain_info(xc, domid)
        return domid
    matches = [d.domid for d in list_domains(xc, xs) if d.name == target]
    if not matches:
        raise XendbgError(f"no domain named {target!r}")
    return matches[0]
