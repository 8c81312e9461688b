"""The ctypes layouts of backend/xen/structs.py against the real Xen headers.

tests/xen_abi/probe.c is compiled with gcc against /usr/include (libxen-dev)
and prints sizeof/offsetof of every structure and field the bindings use; each
line must match the ctypes definition.  ``XENDBG_XEN_INCLUDE`` may name extra
header trees (colon separated, e.g. the public headers of another Xen release)
to check the vm_event layouts of other interface versions the same way.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest

from xendbg.backend.xen import structs

PROBE = Path(__file__).parent / "xen_abi" / "probe.c"


def run_probe(tmp: Path, include: str | None = None) -> list[list[str]]:
    exe = tmp / "probe"
    cmd = ["gcc", "-Wall", "-Werror", "-o", str(exe), str(PROBE)]
    if include:
        cmd[1:1] = ["-I", include]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines()]


def field_layout(cls: type, path: str) -> tuple[int, int]:
    """(offset, size) of a dotted field path inside a ctypes structure."""
    offset = 0
    size = ctypes.sizeof(cls)
    for name in path.split("."):
        types = {f[0]: f[1] for f in cls._fields_}  # type: ignore[attr-defined]
        if name not in types:
            raise KeyError(f"{cls.__name__} has no field {name}")
        descr = getattr(cls, name)
        offset += descr.offset
        size = descr.size
        cls = types[name]
    return offset, size


def ctypes_classes(version: int, xen_version: tuple[int, int]) -> dict[str, type]:
    vm = structs.vm_event_types(version)
    return {
        "hvm_save_descriptor": structs.hvm_save_descriptor,
        "hvm_save_header": structs.hvm_save_header,
        "hvm_hw_cpu": structs.hvm_hw_cpu,
        "cpu_user_regs_x86_64": structs.cpu_user_regs_x86_64,
        "trap_info_x86_64": structs.trap_info_x86_64,
        "vcpu_guest_context_x86_64": structs.vcpu_guest_context_x86_64,
        "cpu_user_regs_x86_32": structs.cpu_user_regs_x86_32,
        "trap_info_x86_32": structs.trap_info_x86_32,
        "vcpu_guest_context_x86_32": structs.vcpu_guest_context_x86_32,
        "vcpu_guest_context_any": structs.vcpu_guest_context_any,
        "xen_domctl_getdomaininfo": structs.domaininfo_type(xen_version),
        "vm_event_sring": structs.vm_event_sring,
        "vm_event_st": vm.st,
        "vm_event_regs_x86": vm.regs_x86,
        "vm_event_debug": vm.debug,
        "vm_event_x86_selector_reg": structs.vm_event_x86_selector_reg,
    }


def compare(lines: list[list[str]], xen_version: tuple[int, int]) -> int:
    """Assert every probe line matches ctypes; returns the number of checks."""
    consts = {k: int(v) for tag, k, v in (ln for ln in lines if ln[0] == "V")}
    version = consts["VM_EVENT_INTERFACE_VERSION"]
    classes = ctypes_classes(version, xen_version)
    vm = structs.vm_event_types(version)
    header = ctypes.sizeof(structs.vm_event_sring)
    checked = 0
    for line in lines:
        tag = line[0]
        if tag == "S":
            name, size = line[1], int(line[2])
            if name == "vm_event_sring":  # the C type includes ring[1]
                assert header + vm.entry_size == size
            elif name == "vm_event_sring_entry":
                assert vm.entry_size == size
            else:
                assert ctypes.sizeof(classes[name]) == size, name
        elif tag == "O":
            name, path, off, size = line[1], line[2], int(line[3]), int(line[4])
            if name == "vm_event_sring" and path == "ring":
                assert (header, vm.entry_size) == (off, size)
            else:
                assert field_layout(classes[name], path) == (off, size), f"{name}.{path}"
        checked += 1
    assert consts["HVM_SAVE_CODE_END"] == structs.HVM_SAVE_CODE_END
    assert consts["HVM_SAVE_CODE_HEADER"] == structs.HVM_SAVE_CODE_HEADER
    assert consts["HVM_SAVE_CODE_CPU"] == structs.HVM_SAVE_CODE_CPU
    assert consts["HVM_FILE_MAGIC"] == structs.HVM_FILE_MAGIC
    return checked


def installed_xen_version() -> tuple[int, int]:
    """Major.minor of the installed libxenctrl, from its versioned soname."""
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    for path in sorted(libdir.glob("libxenctrl.so.4.*")):
        parts = path.name.split(".")
        return int(parts[2]), int(parts[3])
    pytest.fail("libxenctrl.so.4.* not found next to the headers")


def test_layouts_match_installed_headers(tmp_path: Path) -> None:
    lines = run_probe(tmp_path)
    checked = compare(lines, installed_xen_version())
    # Other header trees given by the environment (e.g. 4.11's vm_event.h, interface 3).
    xen = os.environ.get("XENDBG_XEN_VERSION", "4.17").split(".")
    for include in filter(None, os.environ.get("XENDBG_XEN_INCLUDE", "").split(":")):
        compare(run_probe(tmp_path, include), (int(xen[0]), int(xen[1])))
    # Every structure of the bindings is present, not just a few.
    names = {ln[1] for ln in lines if ln[0] == "S"}
    assert names >= set(ctypes_classes(7, (4, 17))) - {"vm_event_sring_entry"}
    assert checked > 250


def test_ring_geometry_of_installed_version(tmp_path: Path) -> None:
    lines = run_probe(tmp_path)
    version = next(int(ln[2]) for ln in lines if ln[:2] == ["V", "VM_EVENT_INTERFACE_VERSION"])
    entry = next(int(ln[2]) for ln in lines if ln[:2] == ["S", "vm_event_sring_entry"])
    # __RING_SIZE: (PAGE_SIZE - header) / entry rounded down to a power of two.
    n = (4096 - 64) // entry
    expected = 1 << (n.bit_length() - 1)
    assert structs.vm_event_types(version).ring_entries() == expected


def test_versions_differ_as_the_header_history_says() -> None:
    sizes = {v: ctypes.sizeof(structs.vm_event_types(v).regs_x86) for v in (3, 4, 5, 6, 7)}
    assert sizes[5] == sizes[4] + 8  # gdtr_base (+ gdtr_limit in the old padding)
    assert sizes[6] == sizes[5]
    assert sizes[7] == sizes[6] + 16  # npt_base, vmtrace_pos
    for v in (3, 4, 5):
        assert not hasattr(structs.vm_event_types(v).debug, "pending_dbg")
    assert hasattr(structs.vm_event_types(6).debug, "pending_dbg")
    for v in (3, 4, 5, 6, 7):  # the union ``u`` (mem_access) stays 32 bytes
        assert field_layout(structs.vm_event_types(v).st, "data")[0] == 24 + 32
    with pytest.raises(ValueError):
        structs.vm_event_types(2)
