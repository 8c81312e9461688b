"""Register layouts, g/G/p/P encoding, target.xml and qRegisterInfo.

The target descriptions are checked by the real clients: gdb 13 loads each one
offline (``set tdesc filename``), and gdb and lldb 14 connect to
``RegisterOnlyStub`` — a test harness that answers just the handshake and the
register packets from this module's helpers, not xendbg's server — and read and
write every register.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xendbg.arch.x86 import regnames
from xendbg.arch.x86.registers import (
    CORE,
    SEGMENTS,
    SSE,
    SYSTEM,
    RegisterDesc,
    RegisterLayout,
    decode_g,
    encode_g,
    g_hex,
    layout,
    parse_reg_hex,
    reg_hex,
    register_info,
    target_xml,
    xfer_slice,
)
from xendbg.errors import RemoteProtocolError

LAYOUTS = [(8, True), (8, False), (4, True), (4, False)]
LAYOUT_IDS = ["x86_64-fpu", "x86_64-nofpu", "i386-fpu", "i386-nofpu"]

X87_NAMES = [f"st{i}" for i in range(8)] + [
    "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop",
]  # fmt: skip
EXPECTED_64 = (
    ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
    + [f"r{i}" for i in range(8, 16)]
    + ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"]
    + X87_NAMES
)
SSE_64 = [f"xmm{i}" for i in range(16)] + ["mxcsr"]
SYSTEM_64 = ["fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"]
EXPECTED_32 = [
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi",
    "eip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", *X87_NAMES,
]  # fmt: skip
SSE_32 = [f"xmm{i}" for i in range(8)] + ["mxcsr"]
SYSTEM_32 = ["fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "efer"]
TAIL = [
    "dr0", "dr1", "dr2", "dr3", "dr6", "dr7",
    "gdtr_base", "gdtr_limit", "idtr_base", "idtr_limit", "ldtr", "tr",
]  # fmt: skip


def expected_names(word_size: int, fpu: bool) -> list[str]:
    if word_size == 8:
        return EXPECTED_64 + (SSE_64 if fpu else []) + SYSTEM_64 + TAIL
    return EXPECTED_32 + (SSE_32 if fpu else []) + SYSTEM_32 + TAIL


def random_values(lay: RegisterLayout, rng: random.Random) -> dict[str, int]:
    return {r.source: rng.getrandbits(r.bitsize) for r in lay.registers}


@pytest.fixture(params=LAYOUTS, ids=LAYOUT_IDS)
def lay(request: pytest.FixtureRequest) -> RegisterLayout:
    word_size, fpu = request.param
    return layout(word_size, fpu)


# -- layouts -------------------------------------------------------------------


def test_layout_order_and_numbering(lay: RegisterLayout) -> None:
    assert [r.name for r in lay.registers] == expected_names(lay.word_size, lay.fpu)
    assert [r.regnum for r in lay.registers] == list(range(len(lay)))
    offset = 0
    for r in lay.registers:
        assert r.offset == offset
        offset += r.size
    assert lay.g_size == offset


NARROW_32 = ("eflags", "cs", "ss", "ds", "es", "fs", "gs", "mxcsr", "ldtr", "tr")


def test_layout_sizes(lay: RegisterLayout) -> None:
    word_bits = 8 * lay.word_size
    for r in lay.registers:
        if r.name.startswith("st"):
            assert r.bitsize == 80
        elif r.name.startswith("xmm"):
            assert r.bitsize == 128
        elif r.name in NARROW_32 or r.name in X87_NAMES or r.name.endswith("_limit"):
            assert r.bitsize == 32
        elif r.name == "efer":
            assert r.bitsize == 64
        else:  # GPRs, rip, bases, control and debug registers: one word
            assert r.bitsize == word_bits, r.name


def test_features_in_gdb_order(lay: RegisterLayout) -> None:
    features = list(dict.fromkeys(r.feature for r in lay.registers))
    if lay.word_size == 8:
        assert features == ([CORE, SSE] if lay.fpu else [CORE]) + [SEGMENTS, SYSTEM]
    else:
        assert features == ([CORE, SSE] if lay.fpu else [CORE]) + [SYSTEM]


def test_sources_are_canonical(lay: RegisterLayout) -> None:
    sources = [r.source for r in lay.registers]
    assert len(set(sources)) == len(sources)
    assert set(sources) <= set(regnames.ALL)
    assert (set(regnames.SSE) & set(sources) != set()) == lay.fpu
    # The x87 registers stay even without FPU state: gdb's i386 core demands them.
    assert set(regnames.X87) <= set(sources)
    if lay.word_size == 8:
        assert set(regnames.BASE) <= set(sources)
        assert lay.by_name("k_gs_base").source == "kernel_gs_base"
    else:
        assert lay.by_name("eax").source == "rax"
        assert lay.by_name("eip").source == "rip"
        assert lay.by_source("rflags").name == "eflags"
    assert lay.by_name("eflags").source == "rflags"
    for r in lay.registers:
        assert lay.by_regnum(r.regnum) is r
        assert lay.gdb_name(r.source) == r.name
        assert lay.source_name(r.name) == r.source
    with pytest.raises(KeyError):
        lay.by_regnum(len(lay))


def test_lldb_roles_x86_64() -> None:
    lay = layout(8, True)
    roles = {r.generic: r.name for r in lay.registers if r.generic}
    assert roles == {
        "pc": "rip", "sp": "rsp", "fp": "rbp", "flags": "eflags",
        "arg1": "rdi", "arg2": "rsi", "arg3": "rdx", "arg4": "rcx", "arg5": "r8", "arg6": "r9",
    }  # fmt: skip
    dwarf = {r.name: r.dwarf for r in lay.registers}
    assert [dwarf[n] for n in ("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp")] == list(
        range(8)
    )
    assert dwarf["rip"] == 16 and dwarf["xmm0"] == 17 and dwarf["st0"] == 33
    assert dwarf["eflags"] == 49 and dwarf["fs_base"] == 58 and dwarf["mxcsr"] == 64


def test_lldb_roles_i386() -> None:
    lay = layout(4, True)
    roles = {r.generic: r.name for r in lay.registers if r.generic}
    assert roles == {"pc": "eip", "sp": "esp", "fp": "ebp", "flags": "eflags"}
    assert [r.dwarf for r in lay.registers[:10]] == list(range(10))
    assert lay.by_name("xmm0").dwarf == 21 and lay.by_name("st0").dwarf == 11


def test_bad_word_size() -> None:
    with pytest.raises(ValueError):
        layout(2, True)


# -- g / G / p / P -------------------------------------------------------------


@st.composite
def layout_and_values(draw: st.DrawFn) -> tuple[RegisterLayout, dict[str, int]]:
    lay = layout(*draw(st.sampled_from(LAYOUTS)))
    values = {r.source: draw(st.integers(0, 2**64 * r.mask)) for r in lay.registers}
    return lay, values


@given(layout_and_values())
def test_g_round_trip(case: tuple[RegisterLayout, dict[str, int]]) -> None:
    lay, values = case
    text = g_hex(lay, values)
    assert len(text) == 2 * lay.g_size
    assert encode_g(lay, values).hex() == text
    masked = {r.source: values[r.source] & r.mask for r in lay.registers}
    assert decode_g(lay, text) == masked


@given(layout_and_values(), st.data())
def test_g_unavailable_and_partial(
    case: tuple[RegisterLayout, dict[str, int]], data: st.DataObject
) -> None:
    lay, values = case
    absent = data.draw(st.sets(st.sampled_from([r.source for r in lay.registers])))
    present = {k: v for k, v in values.items() if k not in absent}
    text = g_hex(lay, present)
    for r in lay.registers:
        chunk = text[2 * r.offset : 2 * (r.offset + r.size)]
        assert (chunk == "xx" * r.size) == (r.source in absent)
    assert decode_g(lay, text) == {r.source: present[r.source] & r.mask for r in lay.registers
                                   if r.source in present}  # fmt: skip
    # A short G packet sets exactly the registers it covers completely.
    cut = data.draw(st.integers(0, lay.g_size))
    partial = decode_g(lay, text[: 2 * cut])
    covered = {r.source for r in lay.registers if r.offset + r.size <= cut} - absent
    assert set(partial) == covered
    with pytest.raises(ValueError, match="no value"):
        encode_g(lay, present) if absent else encode_g(lay, {})


def test_g_rejects_malformed(lay: RegisterLayout) -> None:
    good = g_hex(lay, {})
    with pytest.raises(RemoteProtocolError):
        decode_g(lay, good + "00")
    with pytest.raises(RemoteProtocolError):
        decode_g(lay, "000")
    with pytest.raises(RemoteProtocolError):
        decode_g(lay, "zz" * lay.g_size)


def test_p_and_P_every_register(lay: RegisterLayout) -> None:
    rng = random.Random(lay.g_size)
    for r in lay.registers:
        value = rng.getrandbits(r.bitsize + 16)
        text = reg_hex(r, value)
        assert len(text) == 2 * r.size
        assert text == (value & r.mask).to_bytes(r.size, "little").hex()
        assert parse_reg_hex(r, text) == value & r.mask
        assert reg_hex(r, None) == "xx" * r.size
        with pytest.raises(RemoteProtocolError):
            parse_reg_hex(r, text + "00")
        with pytest.raises(RemoteProtocolError):
            parse_reg_hex(r, "g" + text[1:])


def test_32bit_masking() -> None:
    lay = layout(4, False)
    eax, eflags, efer = lay.by_name("eax"), lay.by_name("eflags"), lay.by_name("efer")
    assert reg_hex(eax, 0xDEADBEEF_12345678) == "78563412"
    assert reg_hex(eflags, 0xFFFF_0000_0000_0246) == "46020000"
    assert reg_hex(efer, 0x1_0000_0D01) == "010d000001000000"
    text = g_hex(lay, {"rax": 0xDEADBEEF_12345678})
    assert text[:8] == "78563412"
    assert decode_g(lay, text) == {"rax": 0x12345678}


# -- target.xml ------------------------------------------------------------------


def test_xml_matches_layout(lay: RegisterLayout) -> None:
    root = ET.fromstring(target_xml(lay).split("\n", 2)[2])
    assert root.tag == "target"
    assert root.findtext("architecture") == ("i386:x86-64" if lay.word_size == 8 else "i386")
    regs = root.findall("feature/reg")
    assert [e.get("name") for e in regs] == [r.name for r in lay.registers]
    for e, r in zip(regs, lay.registers, strict=True):
        assert e.get("regnum") == str(r.regnum)
        assert e.get("bitsize") == str(r.bitsize)
        assert e.get("offset") == str(r.offset)
        assert e.get("generic") == r.generic
    for feature in root.findall("feature"):
        declared = {t.get("id") for t in feature if t.tag in ("flags", "union", "vector")}
        used = {e.get("type") for e in feature.findall("reg")}
        builtin = {"int", "int32", "int64", "data_ptr", "code_ptr", "i387_ext"}
        assert used - builtin <= declared
    eflags = root.find("feature/flags[@id='i386_eflags']")
    assert eflags is not None
    bits = {f.get("name"): int(f.get("start", "-1")) for f in eflags}
    assert {"CF": 0, "PF": 2, "AF": 4, "ZF": 6, "SF": 7, "TF": 8, "IF": 9, "DF": 10}.items() <= (
        bits.items()
    )
    assert bits["OF"] == 11


def _gdb(*commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["gdb", "-nx", "-batch"]
    for c in commands:
        argv += ["-ex", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _gdb_table(stdout: str) -> list[list[str]]:
    """Rows of a ``maint print …-registers`` table, pseudo and empty slots dropped."""
    rows = [line.split() for line in stdout.splitlines()[1:]]
    return [row for row in rows if row and row[0] != "''" and row[0] != "Name"]


@pytest.mark.parametrize(("word_size", "fpu"), LAYOUTS, ids=LAYOUT_IDS)
def test_gdb_loads_target_xml(word_size: int, fpu: bool, tmp_path: Path) -> None:
    lay = layout(word_size, fpu)
    path = tmp_path / "target.xml"
    path.write_text(target_xml(lay))
    proc = _gdb(
        f"set architecture {lay.architecture}",
        f"set tdesc filename {path}",
        "maint print remote-registers",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # a rejected description warns here
    # Name Nr Rel Offset Size Type RmtNr g/G-offset: keep rows with a remote number.
    rows = [row for row in _gdb_table(proc.stdout) if len(row) == 8]
    rows.sort(key=lambda row: int(row[6]))
    got = [(row[0], int(row[4]), int(row[6]), int(row[7])) for row in rows]
    assert got == [(r.name, r.size, r.regnum, r.offset) for r in lay.registers]


def test_xfer_slice_reassembles() -> None:
    text = target_xml(layout(8, True))
    for size in (1, 0x3F, 0x1000, len(text), 0x1FFFF):
        parts, offset = [], 0
        while True:
            reply = xfer_slice(text, offset, size)
            parts.append(reply[1:])
            offset += size
            if reply[0] == "l":
                break
            assert reply[0] == "m" and len(reply) == size + 1
        assert "".join(parts) == text
    assert xfer_slice(text, len(text) + 5, 10) == "l"
    with pytest.raises(RemoteProtocolError):
        xfer_slice(text, -1, 10)


def test_register_info(lay: RegisterLayout) -> None:
    for r in lay.registers:
        reply = register_info(lay, r.regnum)
        assert reply is not None and reply.endswith(";")
        fields = dict(kv.split(":", 1) for kv in reply[:-1].split(";"))
        assert fields["name"] == r.name
        assert int(fields["bitsize"]) == r.bitsize
        assert int(fields["offset"]) == r.offset
        assert fields["encoding"] == ("vector" if r.bitsize in (80, 128) else "uint")
        assert fields.get("generic") == r.generic
        assert fields.get("dwarf") == (None if r.dwarf is None else str(r.dwarf))
    assert register_info(lay, len(lay)) is None
    assert register_info(lay, -1) is None


# -- real clients against a register-only stub ----------------------------------------


class RegisterOnlyStub:
    """Test harness: a one-connection RSP responder for registers only.

    It answers the connect handshake of gdb 13 and lldb 14 (see
    shared/notes/rsp-clients.md), serves target.xml (or, with ``xml=False``,
    qRegisterInfo), and implements g/G/p/P on ``values`` with the helpers under
    test.  Memory reads fail; everything else gets the empty "unsupported" reply.
    """

    def __init__(self, lay: RegisterLayout, values: dict[str, int], *, xml: bool = True) -> None:
        self.lay = lay
        self.values = values
        self.xml = xml
        self.log: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(30)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(timeout=30)
        self._listener.close()

    def _reply(self, pkt: str) -> str:
        lay = self.lay
        if pkt.startswith("qSupported"):
            xfer = ";qXfer:features:read+" if self.xml else ""
            return "PacketSize=4000;QStartNoAckMode+" + xfer
        if pkt.startswith("qXfer:features:read:target.xml:") and self.xml:
            offset, length = (int(x, 16) for x in pkt.rsplit(":", 1)[1].split(","))
            return xfer_slice(target_xml(lay), offset, length)
        if pkt == "qHostInfo":
            # Without target.xml lldb takes the byte order from here (else it swaps).
            triple = "x86_64-unknown-unknown" if lay.word_size == 8 else "i386-unknown-unknown"
            return f"triple:{triple.encode().hex()};endian:little;ptrsize:{lay.word_size};"
        if pkt.startswith("qRegisterInfo"):
            return register_info(lay, int(pkt[13:], 16)) or "E45"
        fixed = {"?": "T05thread:01;", "qfThreadInfo": "m01", "qsThreadInfo": "l"}
        fixed |= {"qAttached": "1", "qC": "QC01", "QStartNoAckMode": "OK"}
        if pkt in fixed:
            return fixed[pkt]
        if pkt[0] == "H":
            return "OK"
        if pkt == "g":
            return g_hex(lay, self.values)
        if pkt[0] == "G":
            self.values |= decode_g(lay, pkt[1:])
            return "OK"
        if pkt[0] == "p":
            n = int(pkt[1:].split(";")[0], 16)
            if n >= len(lay) or lay.registers[n].source not in self.values:
                return "E45"  # lldb 14 shows 'xx' as 0xcc bytes; an error reads "unavailable"
            r = lay.registers[n]
            return reg_hex(r, self.values[r.source])
        if pkt[0] == "P":
            number, text = pkt[1:].split(";")[0].split("=")
            r = lay.by_regnum(int(number, 16))
            self.values[r.source] = parse_reg_hex(r, text)
            return "OK"
        if pkt[0] == "m":
            return "E01"
        return ""

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        ack, buf = True, b""
        with conn:
            while data := conn.recv(65536):
                buf += data
                while m := re.match(rb"[+\-\x03]*\$([^#]*)#[0-9a-fA-F]{2}", buf):
                    buf = buf[m.end() :]
                    pkt = m.group(1).decode()
                    self.log.append(pkt)
                    if ack:
                        conn.sendall(b"+")
                    if pkt in ("k", "D") or pkt.startswith("vKill"):
                        conn.sendall(b"$OK#9a")
                        return
                    reply = self._reply(pkt).encode()
                    ack = ack and pkt != "QStartNoAckMode"
                    conn.sendall(b"$%s#%02x" % (reply, sum(reply) & 0xFF))


@pytest.fixture
def stub(lay: RegisterLayout) -> Iterator[RegisterOnlyStub]:
    values = random_values(lay, random.Random(lay.g_size))
    if not lay.fpu:
        values = {k: v for k, v in values.items() if k not in regnames.X87}
    server = RegisterOnlyStub(lay, values)
    yield server
    server.join()


def test_gdb_reads_and_writes_registers(lay: RegisterLayout, stub: RegisterOnlyStub) -> None:
    sent = dict(stub.values)
    pc = lay.by_source("rip").name
    proc = _gdb(
        f"target remote 127.0.0.1:{stub.port}",
        "maint print raw-registers",
        f"set ${pc} = 0x1234",  # P packet
        "set remote set-register-packet off",
        "set $cr3 = 0x5000",  # now G packet
        "detach",
    )
    assert "warning: No executable" in proc.stderr  # gdb's only complaint: no file
    assert "rror" not in proc.stderr and "rejected" not in proc.stderr, proc.stderr
    raw = {row[0]: row[6] for row in _gdb_table(proc.stdout) if len(row) == 7}
    for r in lay.registers:
        expected = f"{sent[r.source] & r.mask:#0{2 * r.size + 2}x}" if r.source in sent else None
        assert raw[r.name] == (expected or "<unavailable>"), r.name
    assert any(p.startswith(f"P{lay.by_source('rip').regnum:x}=") for p in stub.log)
    assert any(p.startswith("G") for p in stub.log)
    assert stub.values["rip"] == 0x1234 and stub.values["cr3"] == 0x5000
    untouched = {k for k in sent if k not in ("rip", "cr3")}
    assert {k: stub.values[k] for k in untouched} == {k: sent[k] for k in untouched}


def _lldb_registers(port: int, *extra: str) -> tuple[dict[str, int], str]:
    argv = ["lldb", "-b", "-o", f"gdb-remote 127.0.0.1:{port}", "-o", "register read --all"]
    for command in extra:
        argv += ["-o", command]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    values: dict[str, int] = {}
    for m in re.finditer(r"^\s*(\w+) = (0x[0-9a-f]+|\{[^}]*\})", proc.stdout, re.M):
        name, text = m.groups()
        if text.startswith("{"):  # vector: bytes in memory (little-endian) order
            value = int.from_bytes(bytes(int(b, 16) for b in text[1:-1].split()), "little")
        else:
            value = int(text, 16)
        values.setdefault(name, value)  # first listing wins over lldb's derived sets
    return values, proc.stdout


def test_lldb_reads_registers_with_p(lay: RegisterLayout, stub: RegisterOnlyStub) -> None:
    generic = "pc sp fp flags" + (" arg1 arg6" if lay.word_size == 8 else "")
    got, out = _lldb_registers(stub.port, f"register read {generic}")
    for r in lay.registers:
        if r.source in stub.values:
            assert got[r.name] == stub.values[r.source] & r.mask, r.name
        else:
            assert r.name not in got
    if not lay.fpu:
        assert "16 registers were unavailable" in out
    # The generic roles resolve: lldb prints the aliased register for each role.
    roles = {r.generic: r for r in lay.registers if r.generic and r.generic != "flags"}
    for role in generic.split():
        if role in roles:
            r = roles[role]
            shown = f"{stub.values[r.source]:#0{2 * r.size + 2}x}"
            assert re.search(rf"^\s*{r.name} = {shown}", out, re.M), role
    assert all(not p.startswith("g") for p in stub.log)  # lldb 14 reads with p only


def test_lldb_qregisterinfo_fallback() -> None:
    lay = layout(8, True)
    values = random_values(lay, random.Random(7))
    server = RegisterOnlyStub(lay, values, xml=False)
    try:
        got, _ = _lldb_registers(server.port)
    finally:
        server.join()
    assert any(p.startswith("qRegisterInfo") for p in server.log)
    for r in lay.registers:
        assert got[r.name] == values[r.source] & r.mask, r.name


def test_descriptor_properties() -> None:
    r = RegisterDesc("x", "rax", 80, "i387_ext", CORE, "float", 0, 0)
    assert r.size == 10 and r.mask == (1 << 80) - 1
    assert (r.lldb_encoding, r.lldb_format) == ("vector", "vector-uint8")
