"""Host-side checks of the Xen lab's console protocol and initramfs archives (no QEMU)."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

import labcpio
import labproto
import pytest
from hypothesis import given
from hypothesis import strategies as st
from labproto import FAILED, PASSED, Console, Result

LAB = Path(__file__).resolve().parents[2] / "lab"


def transcript(*results: Result, summary: bool = True) -> list[str]:
    lines = [
        "(XEN) Xen version 4.17.7 (Debian 4.17.7+13) debug=n",
        "[    3.717489] Xen version: 4.17.7 (preserve-AD)",
        labproto.marker(labproto.INIT),
        labproto.marker(labproto.TOOLSTACK),
        labproto.marker(labproto.INFO, {"xen_version": "4.17.7"}),
    ]
    for r in results:
        lines += [labproto.marker(labproto.BEGIN, r.name), "(d1) vcpu 0 counter=0x100000"]
        lines.append(labproto.marker(labproto.RESULT, r.as_dict()))
    if summary:
        lines.append(labproto.marker(labproto.SUMMARY, [r.as_dict() for r in results]))
    lines.append(labproto.marker(labproto.END))
    return lines


def feed_all(lines: list[str]) -> Console:
    con = Console()
    for line in lines:
        con.feed(line + "\r")  # the serial console ends lines with CR LF
    return con


def test_transcript_gives_progress_info_and_results() -> None:
    results = [Result("lab-boot", PASSED, 1.1), Result("xen-list", FAILED, 7.0, "exit status 2")]
    con = feed_all(transcript(*results))
    assert con.reached_init and con.toolstack_up and con.ended
    assert con.info == {"xen_version": "4.17.7"}
    assert con.final_results() == results
    assert con.garbled == [] and con.lab_errors == []


def test_marker_behind_an_interleaved_prefix_is_found() -> None:
    con = Console()
    line = "(XEN) d1v0 spurious" + labproto.marker(labproto.BEGIN, "pvh-attach")
    assert con.feed(line) == labproto.BEGIN
    assert con.current == "pvh-attach"


def test_garbled_summary_falls_back_to_the_per_scenario_results() -> None:
    results = [Result("a", PASSED, 1.0), Result("b", FAILED, 2.0, "boom")]
    lines = transcript(*results)
    summary = next(i for i, s in enumerate(lines) if "XENLAB:summary" in s)
    lines[summary] = lines[summary][:40] + "(XEN) cut" + lines[summary][40:]
    con = feed_all(lines)
    assert con.summary is None
    assert len(con.garbled) == 1
    assert con.final_results() == results


def test_lab_error_and_unknown_markers() -> None:
    con = Console()
    assert con.feed("@@XENLAB:lab-error modprobe xenfs failed") == labproto.LAB_ERROR
    assert con.lab_errors == ["modprobe xenfs failed"]
    assert con.feed("@@XENLAB:bogus 1") is None
    assert con.feed('@@XENLAB:result {"name": "x", "outcome": "maybe"}') is None
    assert len(con.garbled) == 2 and con.results == {}


@given(
    name=st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=40),
    outcome=st.sampled_from(labproto.OUTCOMES),
    seconds=st.floats(0, 1e4, allow_nan=False),
    detail=st.text(max_size=200),
)
def test_result_marker_round_trip(name: str, outcome: str, seconds: float, detail: str) -> None:
    result = Result(name, outcome, seconds, detail)
    line = labproto.marker(labproto.RESULT, result.as_dict())
    assert "\n" not in line and "\r" not in line  # one console line, whatever the detail
    con = Console()
    assert con.feed(line) == labproto.RESULT
    assert con.results == {name: result}


def test_init_script_prints_the_protocol_markers() -> None:
    init = (LAB / "init").read_text()
    for kind in (labproto.INIT, labproto.TOOLSTACK, labproto.LAB_ERROR):
        assert re.search(re.escape(labproto.MARK + kind) + r"\b", init), kind
    assert "labrunner.py" in init and "poweroff -f" in init


def test_cpio_entries_parents_first_modes_and_alignment() -> None:
    buf = io.BytesIO()
    archive = labcpio.Archive(buf)
    archive.file("init", b"#!/bin/sh\n", 0o755)
    archive.file("/opt/xendbg/src/a.py", b"x = 1\n")
    archive.file("opt/xendbg/src/b.py", b"")
    archive.close()
    data = buf.getvalue()
    assert len(data) % 4 == 0
    entries = labcpio.read_names(data)
    names = [name for name, _, _ in entries]
    assert names == ["init", "opt", "opt/xendbg", "opt/xendbg/src", "opt/xendbg/src/a.py",
                     "opt/xendbg/src/b.py"]  # fmt: skip
    modes = {name: mode for name, mode, _ in entries}
    assert modes["init"] == stat.S_IFREG | 0o755
    assert stat.S_ISDIR(modes["opt/xendbg"])
    assert entries[4][2] == b"x = 1\n"
    assert data.endswith(b"TRAILER!!!\0" + b"\0" * (-(110 + 11) % 4))


def test_cpio_tree_filters_and_keeps_exec_bits(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "m.py").write_text("pass\n")
    (tmp_path / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"\0")
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    buf = io.BytesIO()
    archive = labcpio.Archive(buf)
    count = archive.tree(tmp_path, "opt/x", lambda p: "__pycache__" not in p.parts)
    archive.close()
    files = {n: m for n, m, _ in labcpio.read_names(buf.getvalue()) if stat.S_ISREG(m)}
    assert count == 2
    assert files == {"opt/x/pkg/m.py": stat.S_IFREG | 0o644, "opt/x/tool.sh": stat.S_IFREG | 0o755}


def test_cpio_rejects_empty_names_and_bad_data() -> None:
    archive = labcpio.Archive(io.BytesIO())
    with pytest.raises(ValueError):
        archive.file("/", b"")
    with pytest.raises(ValueError, match="no newc header"):
        labcpio.read_names(b"070707" + b"0" * 200)
