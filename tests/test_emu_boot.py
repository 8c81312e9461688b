"""Emulated backend: image loading, the boot contract, registers and memory."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from emu_guests import DATA, TEXT, build_guest
from xendbg.arch.x86.paging import PagingContext, walk
from xendbg.backend.base import Capability, EventKind, GuestType
from xendbg.backend.emu import EmuDomain, VcpuState
from xendbg.backend.emu.loader import BOOT_AREA_SIZE
from xendbg.errors import (
    BackendError,
    GuestImageError,
    GuestMemoryFault,
    Unsupported,
    XendbgError,
)

MIB = 1 << 20
HALT = "_start:\n  hlt\n"


@pytest.fixture
def halted(tmp_path: Path) -> EmuDomain:
    g = build_guest(tmp_path, HALT + ".data\ndata: .quad 0\n")
    d = EmuDomain(g.path, vcpus=2, memory=16 * MIB)
    assert d.wait_state(0, VcpuState.HALTED, 5) and d.wait_state(1, VcpuState.HALTED, 5)
    yield d
    d.close()


def test_long_mode_boot_state(halted: EmuDomain) -> None:
    d = halted
    assert d.guest_type is GuestType.EMU and d.word_size == 8 and d.vcpu_count == 2
    for v in range(2):
        r = d.get_registers(v)
        assert r["rip"] == TEXT + 1  # just past the hlt
        assert r["rdi"] == v
        assert all(r[n] == 0 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rsp", "r8", "r15"))
        assert r["rflags"] & (1 << 9) == 0  # IF clear
        assert r["cr0"] & 0x80000001 == 0x80000001  # PE and PG
        assert r["cr4"] & 0x20 and r["efer"] & 0x500 == 0x500  # PAE, LME|LMA
        assert d.memory_size - BOOT_AREA_SIZE <= r["cr3"] < d.memory_size
        assert r["cs"] == 0x08 and r["ss"] == r["ds"] == 0x10


def test_boot_tables_identity_map_4gib_with_2mib_pages(halted: EmuDomain) -> None:
    r = halted.get_registers(0)
    ctx = PagingContext(r["cr0"], r["cr3"], r["cr4"], r["efer"])
    for linear in (0, TEXT, DATA + 0x123, 0x3FFF_F000, 0x8000_0000, 0xFFFF_FFFF):
        t = walk(halted.read_phys, ctx, linear)
        assert t.gpa == linear and t.page_size == 2 * MIB and t.writable
    with pytest.raises(GuestMemoryFault):
        walk(halted.read_phys, ctx, 1 << 32)


def test_i386_boot_is_flat_protected_mode(tmp_path: Path) -> None:
    g = build_guest(tmp_path, "_start:\n  mov $data, %eax\n  movl $0x1234, (%eax)\n  hlt\n"
                    ".data\ndata: .long 0\n", bits=32)  # fmt: skip
    with EmuDomain(g.path, memory=8 * MIB) as d:
        assert d.word_size == 4
        assert d.wait_state(0, VcpuState.HALTED, 5)
        r = d.get_registers(0)
        assert r["cr0"] & 1 and not r["cr0"] & 0x80000000
        assert r["rdi"] == 0 and r["rax"] == DATA and r["r8"] == 0 and r["xmm15"] == 0
        assert d.read_phys(DATA, 4) == struct.pack("<I", 0x1234)
        with pytest.raises(XendbgError):
            d.set_registers(0, {"r9": 1})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not an elf at all", "not a valid ELF"),
        (b"\x7fELF" + bytes(60), "ELF"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "bad.elf"
    p.write_bytes(content)
    with pytest.raises(GuestImageError, match=message):
        EmuDomain(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError, match="cannot read"):
        EmuDomain(tmp_path / "nope.elf")


def test_wrong_machine(tmp_path: Path) -> None:
    g = build_guest(tmp_path, HALT)
    data = bytearray(g.path.read_bytes())
    struct.pack_into("<H", data, 18, 40)  # e_machine = EM_ARM
    g.path.write_bytes(data)
    with pytest.raises(GuestImageError, match="machine"):
        EmuDomain(g.path)


def test_segment_outside_ram_and_over_boot_tables(tmp_path: Path) -> None:
    g = build_guest(tmp_path, HALT + ".data\ndata: .quad 0\n")
    with pytest.raises(GuestImageError, match="outside guest RAM"):
        EmuDomain(g.path, memory=1 * MIB)  # data at 2 MiB
    # The data page at 2 MiB ends exactly where 2 MiB + 4 KiB of RAM puts the tables.
    with pytest.raises(GuestImageError, match="boot tables"):
        EmuDomain(g.path, memory=2 * MIB + BOOT_AREA_SIZE)


def test_pie_without_fixed_addresses(tmp_path: Path) -> None:
    src = tmp_path / "pie.S"
    src.write_text(".globl _start\n_start: hlt\n")
    import subprocess

    subprocess.run(["as", "--64", "-o", str(tmp_path / "pie.o"), str(src)], check=True)
    subprocess.run(["ld", "-pie", "-o", str(tmp_path / "pie.elf"), str(tmp_path / "pie.o")],
                   check=True)  # fmt: skip
    with pytest.raises(GuestImageError, match="ET_DYN"):
        EmuDomain(tmp_path / "pie.elf")


def test_capabilities_exact(halted: EmuDomain) -> None:
    caps = halted.capabilities
    wanted = (
        Capability.PAUSE_VCPU | Capability.WRITE_REGISTERS | Capability.FPU_REGISTERS
        | Capability.SOFTWARE_BREAKPOINT | Capability.SINGLESTEP | Capability.DEBUG_EXCEPTION
        | Capability.DEBUG_REGISTERS | Capability.MEM_ACCESS | Capability.WRITE_CTRLREG
        | Capability.INJECT_TRAP
    )  # fmt: skip
    assert caps == wanted
    for kind in (EventKind.MOV_TO_MSR, EventKind.CPUID):
        with pytest.raises(Unsupported):
            halted.monitor(kind, True)
    assert Capability.MOV_TO_MSR not in caps and Capability.CPUID not in caps


def test_register_round_trip(halted: EmuDomain) -> None:
    d = halted
    values = {
        "rax": 0x1122334455667788, "r15": 0xDEADBEEF, "rip": TEXT, "rflags": 0x202 & ~0x200,
        "fs_base": 0x7FFF_0000_1000, "gs_base": 0x1234_5000, "kernel_gs_base": 0x5555_0000,
        "xmm0": (1 << 127) | 0xABC, "xmm15": 0x0123456789ABCDEF_FEDCBA9876543210,
        "st0": 0x4000_C90F_DAA2_2168_C235, "mxcsr": 0x1F80 | 0x40,
        "gdtr_limit": 0x2F, "dr0": 0x1000, "cr2": 0xCAFE000,
    }  # fmt: skip
    d.set_registers(1, values)
    r = d.get_registers(1)
    for name, value in values.items():
        assert r[name] == value, name
    assert d.get_registers(0)["rax"] == 0  # other vCPU untouched
    before = d.get_registers(1)
    with pytest.raises(XendbgError):
        d.set_registers(1, {"rax": 1, "bogus": 2})
    with pytest.raises(XendbgError):
        d.set_registers(1, {"rbx": 1 << 64})
    assert d.get_registers(1) == before  # nothing written


def test_registers_of_running_vcpu_are_busy(tmp_path: Path) -> None:
    g = build_guest(tmp_path, "_start:\n  jmp _start\n")
    with EmuDomain(g.path) as d:
        with pytest.raises(BackendError) as e:
            d.get_registers(0)
        assert e.value.errno == 16  # EBUSY
        d.pause()
        assert d.get_registers(0)["rip"] == TEXT
        with pytest.raises(XendbgError):
            d.get_registers(5)


def test_phys_memory_bounds(halted: EmuDomain) -> None:
    d = halted
    size = d.memory_size
    d.write_phys(DATA, b"abcdef")
    assert d.read_phys(DATA + 1, 4) == b"bcde"
    with pytest.raises(GuestMemoryFault) as e:
        d.read_phys(size - 4, 8)
    assert e.value.addr == size
    with pytest.raises(GuestMemoryFault) as e:
        d.write_phys(size - 2, b"xyzw")
    assert e.value.addr == size
    assert d.read_phys(size - 2, 2) == bytes(2)  # nothing partial was written
    with pytest.raises(GuestMemoryFault) as e:
        d.read_phys(size + 10, 1)
    assert e.value.addr == size + 10
