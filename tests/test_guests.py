"""The test guests under tests/guests: build, ELF structure, and a QEMU PVH boot.

The guests are what every other test runs, so their boot contract is checked here
from the outside: program headers and symbols with pyelftools, the Xen notes with
an independent note parser and binutils' readelf, and the 32-bit PVH entry path
end to end by booting each image under QEMU (which honours XEN_ELFNOTE_PHYS32_ENTRY).
"""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

GUESTS_SRC = Path(__file__).parent / "guests"

MiB = 1 << 20
PAGE = 0x1000
LOAD_BASE = 1 * MiB
# The emulated backend's loader keeps its page tables in the top 1 MiB of 64 MiB.
LOAD_LIMIT = 63 * MiB

KERNEL_VIRT_BASE = 0xFFFFFFFF80000000
HH_DATA_VIRT = {64: 0xFFFF800000001000, 32: 0xC0001000}
HH_MARKER = b"HIGHHALF-MARKER\0"

# xen/include/public/elfnote.h
XEN_ELFNOTE_GUEST_OS = 6
XEN_ELFNOTE_GUEST_VERSION = 7
XEN_ELFNOTE_LOADER = 8
XEN_ELFNOTE_PHYS32_ENTRY = 18

MAX_VCPUS = 4


@dataclass(frozen=True)
class GuestSpec:
    name: str
    elfclass: int
    functions: tuple[str, ...]
    # symbol -> size in bytes
    objects: dict[str, int]
    banner: str
    report_every: int


def _loop_guest(name: str, elfclass: int, word: int, cr3_sym: str, banner: str) -> GuestSpec:
    return GuestSpec(
        name=name,
        elfclass=elfclass,
        functions=(
            "_start",
            "pvh_start32",
            "main_loop",
            "tick",
            "compute",
            "build_page_tables",
            "puts",
            "puthex",
        ),
        objects={
            "counter": MAX_VCPUS * word,
            "result": MAX_VCPUS * word,
            "watched": MAX_VCPUS * word,
            "hh_data": len(HH_MARKER),
            "pt_ready": 4,
            "pvh_start_info": word,
            cr3_sym: PAGE,
            "stacks": MAX_VCPUS * 0x4000,
        },
        banner=banner,
        report_every=1 << 20,
    )


GUESTS: dict[str, GuestSpec] = {
    spec.name: spec
    for spec in (
        _loop_guest("longmode", 64, 8, "kernel_pml4", "xendbg test guest: vcpu 0 up"),
        _loop_guest("i386", 32, 4, "page_dir", "xendbg i386 guest: vcpu 0 up"),
        _loop_guest("pae", 32, 4, "pdpt", "xendbg pae guest: vcpu 0 up"),
        GuestSpec(
            name="smp",
            elfclass=64,
            functions=(
                "_start",
                "pvh_start32",
                "worker",
                *(f"spin_{i}" for i in range(MAX_VCPUS)),
                "puts",
                "puthex",
            ),
            objects={
                "counters": MAX_VCPUS * 8,
                "vcpus_online": 4,
                "pvh_start_info": 8,
                "stacks": MAX_VCPUS * 0x4000,
            },
            banner="xendbg smp guest: vcpu 0 up",
            report_every=1 << 16,
        ),
    )
}


def _make(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(GUESTS_SRC), f"OUT={out}", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def guests_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guests")
    proc = _make(out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(params=sorted(GUESTS))
def spec(request: pytest.FixtureRequest) -> GuestSpec:
    return GUESTS[request.param]


@dataclass(frozen=True)
class Image:
    header: Any
    segments: list[dict[str, Any]]
    symbols: dict[str, Any]
    sections: set[str]
    segment_data: list[bytes]

    def load_segments(self) -> Iterator[tuple[dict[str, Any], bytes]]:
        for seg, data in zip(self.segments, self.segment_data, strict=True):
            if seg["p_type"] == "PT_LOAD":
                yield seg, data

    def segment_of(self, vaddr: int) -> tuple[dict[str, Any], bytes]:
        for seg, data in self.load_segments():
            if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_memsz"]:
                return seg, data
        raise AssertionError(f"{vaddr:#x} is in no PT_LOAD segment")


def _read_image(path: Path) -> Image:
    with path.open("rb") as f:
        elf = ELFFile(f)
        segs = list(elf.iter_segments())
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection), "guest must not be stripped"
        return Image(
            header=elf.header,
            segments=[dict(s.header) for s in segs],
            symbols={s.name: s for s in symtab.iter_symbols() if s.name},
            sections={s.name for s in elf.iter_sections()},
            segment_data=[s.data() for s in segs],
        )


def _parse_notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) for each note; 4-byte alignment as Xen and Linux use."""
    notes = []
    off = 0
    while off < len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        off += 12
        name = blob[off : off + namesz]
        off += (namesz + 3) & ~3
        desc = blob[off : off + descsz]
        off += (descsz + 3) & ~3
        notes.append((name, ntype, desc))
    assert off == len(blob), "notes must exactly fill PT_NOTE"
    return notes


def _image(guests_dir: Path, spec: GuestSpec) -> Image:
    return _read_image(guests_dir / f"{spec.name}.elf")


# --------------------------------------------------------------------------- build


def test_build_is_idempotent(guests_dir: Path) -> None:
    elfs = {name: guests_dir / f"{name}.elf" for name in [*GUESTS, "pv64"]}
    mtimes = {name: p.stat().st_mtime_ns for name, p in elfs.items()}
    assert _make(guests_dir, "-q").returncode == 0, "make -q: guests should be up to date"
    proc = _make(guests_dir)
    assert proc.returncode == 0, proc.stderr
    assert "Nothing to be done" in proc.stdout
    assert {name: p.stat().st_mtime_ns for name, p in elfs.items()} == mtimes
    assert not list(guests_dir.glob("*.tmp")), "no temporary files left behind"


def test_source_change_rebuilds_only_dependents(tmp_path: Path) -> None:
    """Touching i386.S rebuilds i386.elf and pae.elf, not the 64-bit guests."""
    src = tmp_path / "src"
    shutil.copytree(GUESTS_SRC, src)
    out = tmp_path / "out"
    cmd = ["make", "-C", str(src), f"OUT={out}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.elf")}
    time.sleep(0.01)
    (src / "i386.S").touch()
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.elf")}
    changed = {name for name in before if after[name] != before[name]}
    assert changed == {"i386.elf", "pae.elf"}


# --------------------------------------------------------------------------- ELF


def test_elf_header(guests_dir: Path, spec: GuestSpec) -> None:
    img = _image(guests_dir, spec)
    assert img.header["e_ident"]["EI_CLASS"] == f"ELFCLASS{spec.elfclass}"
    assert img.header["e_type"] == "ET_EXEC"
    assert img.header["e_machine"] == ("EM_X86_64" if spec.elfclass == 64 else "EM_386")
    assert img.header["e_entry"] == img.symbols["_start"]["st_value"]


def test_load_segments_fit_the_boot_contract(guests_dir: Path, spec: GuestSpec) -> None:
    img = _image(guests_dir, spec)
    ranges = []
    for seg, _ in img.load_segments():
        start, end = seg["p_paddr"], seg["p_paddr"] + seg["p_memsz"]
        assert LOAD_BASE <= start < end <= LOAD_LIMIT, f"{start:#x}..{end:#x}"
        assert start % PAGE == 0 and seg["p_vaddr"] % PAGE == 0
        assert seg["p_offset"] % seg["p_align"] == seg["p_vaddr"] % seg["p_align"]
        assert seg["p_filesz"] <= seg["p_memsz"]
        ranges.append((start, end))
    ranges.sort()
    assert ranges, "no PT_LOAD"
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end <= start, "physical ranges overlap"


def test_entry_points_are_identity_mapped_code(guests_dir: Path, spec: GuestSpec) -> None:
    """Both entries run before the guest's own paging: VMA must equal LMA."""
    img = _image(guests_dir, spec)
    for name in ("_start", "pvh_start32"):
        addr = img.symbols[name]["st_value"]
        seg, _ = img.segment_of(addr)
        assert seg["p_vaddr"] == seg["p_paddr"], name
        assert seg["p_flags"] & 1, f"{name} not in an executable segment"
        assert addr < 4 << 30, "PVH starts with paging off: entry must be below 4 GiB"


def test_symbols(guests_dir: Path, spec: GuestSpec) -> None:
    img = _image(guests_dir, spec)
    for name in spec.functions:
        sym = img.symbols[name]
        assert sym["st_info"]["type"] == "STT_FUNC", name
        assert sym["st_size"] > 0, name
        seg, _ = img.segment_of(sym["st_value"])
        assert seg["p_flags"] & 1, f"{name} not executable"
    for name, size in spec.objects.items():
        sym = img.symbols[name]
        assert sym["st_info"]["type"] == "STT_OBJECT", name
        assert sym["st_size"] == size, name
        seg, _ = img.segment_of(sym["st_value"])
        assert seg["p_flags"] & 2, f"{name} not writable"


def test_debug_info_kept(guests_dir: Path, spec: GuestSpec) -> None:
    """Line tables and CFI let gdb show source and unwind through tick/compute."""
    img = _image(guests_dir, spec)
    assert {".debug_line", ".debug_info", ".debug_frame", ".symtab"} <= img.sections


def test_xen_notes(guests_dir: Path, spec: GuestSpec) -> None:
    img = _image(guests_dir, spec)
    note_segs = [
        (s, d)
        for s, d in zip(img.segments, img.segment_data, strict=True)
        if s["p_type"] == "PT_NOTE"
    ]
    assert len(note_segs) == 1
    seg, blob = note_segs[0]
    # QEMU locates the desc by aligning n_namesz up to p_align.
    assert seg["p_align"] == 4
    notes = {ntype: desc for name, ntype, desc in _parse_notes(blob) if name == b"Xen\0"}
    assert notes[XEN_ELFNOTE_GUEST_OS] == b"xendbg-test\0"
    assert notes[XEN_ELFNOTE_LOADER] == b"generic\0"
    assert notes[XEN_ELFNOTE_GUEST_VERSION].endswith(b"\0")
    desc = notes[XEN_ELFNOTE_PHYS32_ENTRY]
    assert len(desc) == spec.elfclass // 8
    assert int.from_bytes(desc, "little") == img.symbols["pvh_start32"]["st_value"]
    # The notes also sit in a loaded segment, where Xen's libelf may look.
    load_seg, _ = img.segment_of(seg["p_vaddr"])
    assert load_seg["p_offset"] <= seg["p_offset"]
    assert seg["p_offset"] + seg["p_filesz"] <= load_seg["p_offset"] + load_seg["p_filesz"]


def test_readelf_sees_the_pvh_note(guests_dir: Path, spec: GuestSpec) -> None:
    """Cross-check with binutils: readelf -n must show the same PHYS32_ENTRY."""
    out = subprocess.run(
        ["readelf", "-n", "-W", str(guests_dir / f"{spec.name}.elf")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(
        r"^\s*Xen\s+0x[0-9a-f]+\s+Unknown note type: \(0x00000012\)\s+description data: "
        r"((?:[0-9a-f]{2} )+)",
        out,
        re.MULTILINE,
    )
    assert match is not None, out
    entry = int.from_bytes(bytes.fromhex(match.group(1)), "little")
    assert entry == _image(guests_dir, spec).symbols["pvh_start32"]["st_value"]


@pytest.mark.parametrize("name", sorted(n for n, g in GUESTS.items() if "hh_data" in g.objects))
def test_hh_data_page(guests_dir: Path, name: str) -> None:
    spec = GUESTS[name]
    img = _image(guests_dir, spec)
    addr = img.symbols["hh_data"]["st_value"]
    assert addr == HH_DATA_VIRT[spec.elfclass]
    seg, data = img.segment_of(addr)
    assert seg["p_vaddr"] == addr and seg["p_filesz"] == seg["p_memsz"] == PAGE
    assert seg["p_paddr"] != seg["p_vaddr"]
    assert data.startswith(HH_MARKER)


def test_longmode_kernel_runs_in_the_higher_half(guests_dir: Path) -> None:
    img = _image(guests_dir, GUESTS["longmode"])
    for name in ("main_loop", "tick", "compute", "counter", "result", "watched", "stacks"):
        addr = img.symbols[name]["st_value"]
        assert addr >= KERNEL_VIRT_BASE, name
        seg, _ = img.segment_of(addr)
        assert seg["p_vaddr"] - seg["p_paddr"] == KERNEL_VIRT_BASE, name
        # The alias is one 2 MiB page at KERNEL_VIRT_BASE mapping physical 0.
        assert seg["p_paddr"] + seg["p_memsz"] <= 2 * MiB, name
    for name in ("kernel_pml4", "pt_ready", "pvh_start_info"):
        seg, _ = img.segment_of(img.symbols[name]["st_value"])
        assert seg["p_vaddr"] == seg["p_paddr"], f"{name} must be identity-mapped"
    assert img.symbols["kernel_pml4"]["st_value"] % PAGE == 0


# --------------------------------------------------------------------------- QEMU

QEMU = shutil.which("qemu-system-x86_64")


def _boot_under_qemu(elf: Path, console: Path, wanted: int, timeout: float) -> str:
    """Boot `elf` through its PVH note; return debug-console text once it has `wanted` lines."""
    options = "-accel tcg -machine q35 -m 128M -display none -serial none -monitor none -no-reboot"
    proc = subprocess.Popen(
        [str(QEMU), *options.split(), "-kernel", str(elf), "-debugcon", f"file:{console}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = console.read_text(errors="replace") if console.exists() else ""
            if text.count("\n") >= wanted:
                return text
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        stderr = proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else ""
        raise AssertionError(f"console after {timeout}s: {text!r}; qemu stderr: {stderr!r}")
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_pvh_boot_under_qemu(guests_dir: Path, spec: GuestSpec, tmp_path: Path) -> None:
    """QEMU enters at XEN_ELFNOTE_PHYS32_ENTRY like Xen PVH: the 32-bit stub, the guest's
    own paging (and for longmode the higher-half jump) must all work for these lines."""
    text = _boot_under_qemu(guests_dir / f"{spec.name}.elf", tmp_path / "con.txt", 6, 10.0)
    lines = text.splitlines()
    assert lines[0] == spec.banner
    width = spec.elfclass // 4
    # QEMU's PVH option ROM passes a real (non-zero) hvm_start_info address.
    assert re.fullmatch(rf"boot: pvh start_info=0x(?!0+$)[0-9a-f]{{{width}}}", lines[1])
    rest = lines[2:]
    if "hh_data" in spec.objects:
        assert rest[0] == "hh_data: " + HH_MARKER.rstrip(b"\0").decode()
        rest = rest[1:]
    expected = [f"vcpu 0 counter=0x{spec.report_every * k:0{width}x}" for k in (1, 2, 3)]
    assert rest[:3] == expected


# --------------------------------------------------------------------------- PV guest
# pv64.elf boots only as a Xen PV domain (the lab's pv-attach scenario): its notes are what
# Xen's PV domain builder (libelf) reads, checked here against xen/include/public/elfnote.h.

XEN_ELFNOTE_ENTRY = 1
XEN_ELFNOTE_HYPERCALL_PAGE = 2
XEN_ELFNOTE_VIRT_BASE = 3
XEN_ELFNOTE_PADDR_OFFSET = 4
XEN_ELFNOTE_XEN_VERSION = 5
# xen.h hypercall numbers the guest uses (each has a 32-byte stub in the hypercall page)
HYPERCALLS = {"console_io": 18, "sched_op": 29, "event_channel_op": 32}


@pytest.fixture(scope="module")
def pv64(guests_dir: Path) -> Image:
    return _read_image(guests_dir / "pv64.elf")


def _xen_notes(img: Image) -> dict[int, bytes]:
    blobs = [d for s, d in zip(img.segments, img.segment_data, strict=True)
             if s["p_type"] == "PT_NOTE"]  # fmt: skip
    assert len(blobs) == 1
    return {ntype: desc for name, ntype, desc in _parse_notes(blobs[0]) if name == b"Xen\0"}


def test_pv64_is_a_pv_image(pv64: Image) -> None:
    assert pv64.header["e_ident"]["EI_CLASS"] == "ELFCLASS64"
    assert pv64.header["e_machine"] == "EM_X86_64"
    assert pv64.header["e_type"] == "ET_EXEC"
    notes = _xen_notes(pv64)
    assert notes[XEN_ELFNOTE_GUEST_OS] == b"xendbg-test\0"
    assert notes[XEN_ELFNOTE_GUEST_VERSION].endswith(b"\0")
    assert notes[XEN_ELFNOTE_XEN_VERSION] == b"xen-3.0\0"
    assert notes[XEN_ELFNOTE_LOADER] == b"generic\0"
    assert XEN_ELFNOTE_PHYS32_ENTRY not in notes, "PV only: no PVH entry"
    virt_base = int.from_bytes(notes[XEN_ELFNOTE_VIRT_BASE], "little")
    paddr_offset = int.from_bytes(notes[XEN_ELFNOTE_PADDR_OFFSET], "little")
    assert (virt_base, paddr_offset) == (KERNEL_VIRT_BASE, 0)
    entry = int.from_bytes(notes[XEN_ELFNOTE_ENTRY], "little")
    assert entry == pv64.header["e_entry"] == pv64.symbols["_start"]["st_value"]
    # libelf maps each PT_LOAD at p_paddr + VIRT_BASE - PADDR_OFFSET: the symbols must agree.
    loads = [seg for seg, _ in pv64.load_segments()]
    for seg in loads:
        assert seg["p_vaddr"] == seg["p_paddr"] + virt_base - paddr_offset
    kstart = min(s["p_vaddr"] for s in loads)
    kend = max(s["p_vaddr"] + s["p_memsz"] for s in loads)
    hypercall_page = int.from_bytes(notes[XEN_ELFNOTE_HYPERCALL_PAGE], "little")
    assert hypercall_page == pv64.symbols["hypercall_page"]["st_value"]
    assert hypercall_page % PAGE == 0 and kstart <= hypercall_page < kend  # libelf's check
    seg, data = pv64.segment_of(hypercall_page)
    assert seg["p_flags"] & 1, "the hypercall stubs must be executable"
    off = hypercall_page - seg["p_vaddr"]
    assert data[off : off + PAGE] == bytes(PAGE), "Xen fills the page; the image leaves it 0"


def test_pv64_symbols(pv64: Image) -> None:
    for name in ("_start", "main_loop", "tick", "compute", "puts", "puthex", "console_write"):
        sym = pv64.symbols[name]
        assert sym["st_info"]["type"] == "STT_FUNC" and sym["st_size"] > 0, name
        assert pv64.segment_of(sym["st_value"])[0]["p_flags"] & 1, name
    sizes = {"counter": 32, "result": 32, "watched": 32, "pv_data": 16, "start_info": 8,
             "cons_ring": 8, "stacks": 0x4000}  # fmt: skip
    for name, size in sizes.items():
        sym = pv64.symbols[name]
        assert sym["st_info"]["type"] == "STT_OBJECT" and sym["st_size"] == size, name
        assert pv64.segment_of(sym["st_value"])[0]["p_flags"] & 2, name
    seg, data = pv64.segment_of(pv64.symbols["pv_data"]["st_value"])
    off = pv64.symbols["pv_data"]["st_value"] - seg["p_vaddr"]
    assert data[off : off + 16] == b"PV-GUEST-MARKER\0"


def test_pv64_calls_hypercalls_through_their_stubs(pv64: Image) -> None:
    """console_write's calls land on hypercall_page + 32 * nr for the hypercalls it makes."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    sym = pv64.symbols["console_write"]
    seg, data = pv64.segment_of(sym["st_value"])
    off = sym["st_value"] - seg["p_vaddr"]
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    targets = {
        int(insn.op_str, 16)
        for insn in md.disasm(data[off : off + sym["st_size"]], sym["st_value"])
        if insn.mnemonic == "call"
    }
    page = pv64.symbols["hypercall_page"]["st_value"]
    assert targets == {page + 32 * nr for nr in HYPERCALLS.values()}


def test_readelf_sees_the_pv_notes(guests_dir: Path, pv64: Image) -> None:
    """binutils' readelf finds the same Xen notes, in the same order, with the same bytes."""
    out = subprocess.run(["readelf", "-n", "-W", str(guests_dir / "pv64.elf")],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    owners = re.findall(r"^\s*(\S+)\s+0x[0-9a-f]+\s", out.split("Owner", 1)[1], re.M)
    dumped = re.findall(r"description data: ((?:[0-9a-f]{2} )+)", out)
    assert set(owners) == {"Xen"}
    assert [bytes.fromhex(d) for d in dumped] == list(_xen_notes(pv64).values())
