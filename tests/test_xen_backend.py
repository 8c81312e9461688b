"""The Xen backend without a hypervisor: library loading, error paths, domain
classification on fabricated xen_domctl_getdomaininfo structures, and ``xendbg
list`` on this machine (which has libxen-dev but no Xen)."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xendbg.backend.base import Capability, GuestType
from xendbg.backend.xen import _lib, domain, listing, structs
from xendbg.backend.xen.listing import DomainInfo
from xendbg.errors import BackendError, DomainGone, Unsupported
from xendbg.frontend.listing import as_json, format_table

ROOT = Path(__file__).resolve().parent.parent
ON_XEN = os.path.exists("/dev/xen/privcmd") or os.path.exists("/proc/xen/privcmd")


# -- loading and errors -------------------------------------------------------------


def test_missing_library_is_reported_as_xen_not_available() -> None:
    with pytest.raises(_lib.XenNotAvailable) as info:
        _lib.load(("libxenctrl.so.3.99", "libnothere.so"), "libxenctrl")
    assert isinstance(info.value, Unsupported)
    text = str(info.value)
    assert text.startswith("Xen is not available here: cannot load libxenctrl")
    assert "libxenctrl.so.3.99" in text and "dom0" in text


def test_sonames_cover_the_supported_releases() -> None:
    for minor in range(11, 21):
        assert f"libxenctrl.so.4.{minor}" in _lib.XENCTRL_SONAMES
    assert _lib.XENCTRL_SONAMES[-1] == "libxenctrl.so"
    lib = _lib.load(_lib.XENCTRL_SONAMES, "libxenctrl")  # libxen-dev is installed here
    version = _lib.soname_version(lib)
    assert version is not None and version[0] == 4 and 11 <= version[1] <= 20


def test_check_turns_failures_into_typed_errors() -> None:
    assert _lib.check("xc_domain_pause", 0) == 0
    assert _lib.check("xc_version", 0x4_0011) == 0x4_0011
    ctypes.set_errno(errno.EPERM)
    with pytest.raises(BackendError) as info:
        _lib.check("xc_domain_pause", -1)
    assert (info.value.call, info.value.errno) == ("xc_domain_pause", errno.EPERM)
    assert "xc_domain_pause failed: errno 1" in str(info.value)
    with pytest.raises(BackendError) as info:  # negative errno convention
        _lib.check("xenevtchn_bind_interdomain", -errno.EINVAL)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DomainGone):
        _lib.check("xc_vcpu_getcontext", -errno.ESRCH)
    ctypes.set_errno(errno.EBUSY)
    with pytest.raises(BackendError) as info:
        _lib.check_ptr("xc_monitor_enable", None)
    assert info.value.errno == errno.EBUSY
    assert _lib.check_ptr("xc_monitor_enable", 0x1000) == 0x1000


def test_opening_xenctrl_here() -> None:
    """Without a hypervisor: a clear XenNotAvailable; in a dom0 (the lab): a handle."""
    from xendbg.backend.xen.domain import XenDomain
    from xendbg.backend.xen.xenctrl import XenCtrl

    if ON_XEN:
        with XenCtrl() as xc:
            assert xc.version()[0] == 4
            assert xc.vm_event_version() in structs.VM_EVENT_VERSIONS
        return
    with pytest.raises(_lib.XenNotAvailable, match="privcmd"):
        XenCtrl()
    with pytest.raises(_lib.XenNotAvailable, match="Xen is not available here"):
        XenDomain(1)


def test_xendbg_list_here() -> None:
    """``xendbg list`` as a user runs it: exit 1 and one line of reason without Xen."""
    code = (
        "import argparse, sys\n"
        "from xendbg.frontend.listing import cmd_list\n"
        "sys.exit(cmd_list(argparse.Namespace(json=False)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    if ON_XEN:
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:3] == ["ID", "NAME", "TYPE"]
        assert lines[1].split()[:2] == ["0", "Domain-0"]
        return
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("xendbg list: Xen is not available here: xc_interface_open")
    assert "are you in dom0" in proc.stderr
    assert proc.stderr.count("\n") == 1  # the libraries' own chatter is silenced


# -- classification on fabricated domain information --------------------------------


def _info(
    version: tuple[int, int], domid: int, flags: int, emulation: int, **kw: int
) -> ctypes.Structure:
    info = structs.domaininfo_type(version)()
    info.domain = domid
    info.flags = flags
    if version >= (4, 15):
        info.arch_config.emulation_flags = emulation
    else:
        info.arch_config = emulation
    for name, value in kw.items():
        setattr(info, name, value)
    return info


HVM_EMU = 0x3FF  # XEN_X86_EMU_ALL & ~VPCI: what libxl gives an HVM domU
PVH_EMU = structs.XEN_X86_EMU_LAPIC
PVH_DOM0_EMU = structs.XEN_X86_EMU_LAPIC | (1 << 4) | (1 << 10)  # LAPIC | IOAPIC | VPCI


@pytest.mark.parametrize("version", [(4, 11), (4, 14), (4, 15), (4, 17), (4, 20)])
@pytest.mark.parametrize(
    ("flags", "emulation", "expected"),
    [
        (0, 0, GuestType.PV),
        (structs.XEN_DOMINF_hvm_guest, HVM_EMU, GuestType.HVM),
        (structs.XEN_DOMINF_hvm_guest, PVH_EMU, GuestType.PVH),
        (structs.XEN_DOMINF_hvm_guest | structs.XEN_DOMINF_hap, PVH_DOM0_EMU, GuestType.PVH),
    ],
)
def test_guest_type(
    version: tuple[int, int], flags: int, emulation: int, expected: GuestType
) -> None:
    info = _info(version, 3, flags, emulation)
    # Round trip through bytes: the layout of that release, as the library returns it.
    raw = structs.domaininfo_type(version).from_buffer_copy(bytes(info))
    assert listing.guest_type_of(int(raw.flags), listing.emulation_flags(raw)) is expected


def test_domaininfo_layouts_differ_where_the_releases_do() -> None:
    old = structs.domaininfo_type((4, 14))
    new = structs.domaininfo_type((4, 16))
    assert old.arch_config.offset == new.gpaddr_bits.offset  # 4.16 inserted 8 bytes there
    assert new.arch_config.offset == old.arch_config.offset + 8
    assert old.tot_pages.offset == new.tot_pages.offset


@pytest.mark.parametrize(
    ("flags", "state"),
    [
        (structs.XEN_DOMINF_running, "running"),
        (structs.XEN_DOMINF_blocked, "blocked"),
        (structs.XEN_DOMINF_paused | structs.XEN_DOMINF_blocked, "paused"),
        (structs.XEN_DOMINF_shutdown | (0 << 16), "shutdown"),
        (structs.XEN_DOMINF_shutdown | (3 << 16), "crashed"),
        (structs.XEN_DOMINF_dying | structs.XEN_DOMINF_shutdown, "dying"),
        (0, "idle"),
    ],
)
def test_state(flags: int, state: str) -> None:
    assert listing.state_of(flags) == state


def test_hvm_word_size_follows_efer_lma() -> None:
    assert listing.hvm_word_size(0xD01) == 8  # LME | LMA | NXE | SCE
    assert listing.hvm_word_size(0x100) == 4  # LME without LMA: not yet in long mode
    assert listing.hvm_word_size(0) == 4


def test_domain_name_falls_back_without_xenstore() -> None:
    assert listing.domain_name(None, 0) == "Domain-0"
    assert listing.domain_name(None, 7) == ""


# -- capabilities and memory helpers -------------------------------------------------


def test_capabilities_from_the_lab_bitmap() -> None:
    # xc_monitor_get_capabilities on Xen 4.17 under QEMU's emulated SVM (notes/xen-lab.md).
    caps = domain.capabilities_from_monitor(0x1F7B)
    assert caps == (
        Capability.WRITE_CTRLREG
        | Capability.MOV_TO_MSR
        | Capability.SOFTWARE_BREAKPOINT
        | Capability.DEBUG_EXCEPTION
        | Capability.DEBUG_REGISTERS
        | Capability.CPUID
    )
    assert Capability.SINGLESTEP in domain.capabilities_from_monitor(1 << 2)
    assert domain.capabilities_from_monitor(0) == Capability.NONE


def test_frames_and_fault_addresses() -> None:
    assert domain.frames_of(0x1FFF, 2) == [1, 2]
    assert domain.frames_of(0x2000, 0x1000) == [2]
    assert domain.frames_of(0x2000, 0) == [2]
    # The first page faults: the fault is at the access itself, not the page start.
    assert domain.fault_page(0x1000, 0x1F00, [errno.EFAULT, 0]) == (0x1F00, errno.EFAULT)
    assert domain.fault_page(0x1000, 0x1F00, [0, errno.ENOENT]) == (0x2000, errno.ENOENT)
    assert domain.fault_page(0x1000, 0x1F00, [0, 0]) is None


# -- xendbg list output ------------------------------------------------------------------


DOMAINS = [
    DomainInfo(0, "Domain-0", GuestType.PV, 8, 2, 2, 1536 * 1024, "running"),
    DomainInfo(3, "pvh-guest", GuestType.PVH, 4, 1, 2, 64 * 1024, "paused"),
    DomainInfo(4, "", GuestType.HVM, None, 1, 1, 512 * 1024, "blocked"),
]


def test_format_table() -> None:
    lines = format_table(DOMAINS).splitlines()
    assert lines[0].split() == ["ID", "NAME", "TYPE", "WIDTH", "VCPUS", "MEMORY", "STATE"]
    assert lines[1].split() == ["0", "Domain-0", "PV", "64-bit", "2/2", "1536", "MiB", "running"]
    assert lines[2].split() == ["3", "pvh-guest", "PVH", "32-bit", "1/2", "64", "MiB", "paused"]
    assert lines[3].split() == ["4", "-", "HVM", "?", "1/1", "512", "MiB", "blocked"]
    assert len({line.index("TYPE") if "TYPE" in line else None for line in lines[:1]}) == 1
    assert lines[1].index("PV") == lines[0].index("TYPE")  # columns align


def test_json_output() -> None:
    import json

    data = json.loads(as_json(DOMAINS))
    assert [d["type"] for d in data] == ["pv", "pvh", "hvm"]
    assert data[1] == {
        "domid": 3,
        "name": "pvh-guest",
        "type": "pvh",
        "word_size": 4,
        "vcpus": 1,
        "max_vcpus": 2,
        "memory_kib": 65536,
        "state": "paused",
    }
