"""Attaching to real Xen domains through xendbg's engine (issue 6): ``pvh-attach`` and
``pv-attach``.

Each attaches by name, pauses, reads registers and memory through the guest's own page tables,
writes a register and a guest variable, and checks all of it against what the guest itself
does: the marker it printed at boot, its counter, the line it prints for the counter value we
wrote. Then the clean-detach checks: code pages identical to the image before and after, the
domain running (``xl list`` state, the counter still printing) and a second full attach
succeeding (no monitor ring left behind).
"""

from __future__ import annotations

import re
from typing import Any

from labkit import (
    GUESTS,
    LONGMODE_BANNER,
    PV_BANNER,
    Guest,
    check,
    code_hashes,
    create_guest,
    last_counter,
    log,
    probe,
    scenario,
    wait_console,
    xendbg,
)

# A value the guest's counter never reaches on its own in a lab run; the guest prints its
# counter at every multiple of 2^20, so it must print exactly this next.
WRITTEN_COUNTER = 0x7770000000 - 16
EXPECTED_LINE = f"vcpu 0 counter=0x{WRITTEN_COUNTER + 16:016x}"
KERNEL_PML4 = 0x105000  # longmode.elf's kernel_pml4 (identity-mapped, tests/guests/README.md)


def listed(guest: Guest, kind: str) -> None:
    out = xendbg("list").stdout
    row = re.compile(rf"^\s*{guest.domid}\s+{re.escape(guest.name)}\s+{kind}\s+64-bit", re.M)
    check(bool(row.search(out)), f"xendbg list has no '{guest.domid} {guest.name} {kind}' row")


def attach_checks(guest: Guest, elf: str, marker: str, marker_text: str) -> dict[str, Any]:
    """The part both guest types share; returns the inspect probe's report."""
    wait_console(guest, "vcpu 0 counter=0x")
    printed = last_counter(guest)
    got = probe("inspect", guest.name, elf, "--marker", marker, "--write-counter",
                hex(WRITTEN_COUNTER))  # fmt: skip
    log(f"inspect: {got}")
    check("p" in got["state_attached"], f"not paused while attached: {got['state_attached']}")
    check("p" not in got["state_running"], f"paused after resume: {got['state_running']}")
    check(got["rip_at"].split("+")[0] in ("main_loop", "tick", "compute", "puts", "puthex",
                                          "console_write", "hypercall_page"),
          f"rip {got['rip']:#x} ({got['rip_at']}) is outside the guest's loop")  # fmt: skip
    check(got["marker"] == marker_text, f"{marker}: {got['marker']!r} != {marker_text!r}")
    wait_console(guest, f"{marker}: {marker_text}", timeout=5)  # what the guest printed
    check(got["counter"] >= printed, f"counter {got['counter']:#x} < printed {printed:#x}")
    check(got["counter_after_run"] > got["counter"], "the counter did not move while resumed")
    check(got["interrupt_stop"] == "interrupt", f"interrupt gave {got['interrupt_stop']}")
    check(got["r15_written"] == got["r15_after_run"] == 0x5EED0FC0FFEE15, "r15 not kept")
    check(got["counter_written"] == WRITTEN_COUNTER, "the counter write did not read back")
    # The guest picks up the written value: its next line is the next multiple of 2^20.
    line = wait_console(guest, EXPECTED_LINE, timeout=60)
    log(f"the guest printed: {line}")
    check("p" not in got["state_detached"], f"paused after detach: {got['state_detached']}")
    before = code_hashes(guest, elf, got["before"])
    check(code_hashes(guest, elf, got["after"]) == before, "code changed across the session")
    check(got["after"]["reattach"]["ok"] is True, f"second attach: {got['after']}")
    wait_console(guest, f"vcpu 0 counter=0x{WRITTEN_COUNTER + 16 + (1 << 20):016x}")
    return got


@scenario("pvh-attach", timeout=300)
def pvh_attach() -> None:
    """PVH longmode guest: engine reads/writes through its 4-level tables, checked against its
    console; CR3 is the guest's own kernel_pml4."""
    guest = create_guest("longmode-pvh.cfg", "xenlab-pvh", LONGMODE_BANNER)
    listed(guest, "PVH")
    got = attach_checks(guest, str(GUESTS / "longmode.elf"), "hh_data", "HIGHHALF-MARKER")
    check(got["type"] == "pvh", f"type {got['type']}")
    check(got["cr3"] & ~0xFFF == KERNEL_PML4, f"cr3 {got['cr3']:#x} is not kernel_pml4")
    repl_session(guest)


def repl_session(guest: Guest) -> None:
    """`xendbg repl --attach NAME` (the REPL's Xen target), scripted on stdin."""
    script = "guest list\ninfo xen\ninfo registers cr3\nx/15cb 0xffff800000001000\nquit\n"
    out = xendbg("repl", "--attach", guest.name, "--no-color", stdin=script).stdout
    check(f"Attached to domain {guest.domid} ({guest.name})" in out, "REPL did not attach")
    check(bool(re.search(rf"\*\s+{guest.domid}\s+{re.escape(guest.name)}\s+pvh", out)),
          "guest list does not mark the attached guest")  # fmt: skip
    check(bool(re.search(r"^Xen 4\.17\.\d+.*capabilities: .*xen-3\.0-x86_64", out, re.M)),
          "info xen shows no Xen version and capabilities")  # fmt: skip
    check(bool(re.search(rf"^cr3\s+{KERNEL_PML4:#x}\b", out, re.M)), "info registers cr3")
    chars = "".join(re.findall(r"\b\d+ '(.)'", out))
    check("HIGHHALF-MARKER" in chars, f"x/15cb of hh_data shows {chars!r}")
    check("Detached" in out, "the REPL did not detach on quit")
    probe("reattach", guest.name)  # its monitor ring is gone


@scenario("pv-attach", timeout=300)
def pv_attach() -> None:
    """PV guest (pv64.elf): the same through Xen's PV page tables (machine frames); CR3 is
    the machine address of start_info.pt_base."""
    guest = create_guest("pv64-pv.cfg", "xenlab-pv", PV_BANNER, pv_console=True)
    listed(guest, "PV")
    got = attach_checks(guest, str(GUESTS / "pv64.elf"), "pv_data", "PV-GUEST-MARKER")
    check(got["type"] == "pv", f"type {got['type']}")
    check(got["start_info_magic"].startswith("xen-3.0-x86_64"), f"{got['start_info_magic']!r}")
    wait_console(guest, f"boot: pv start_info=0x{got['start_info']:016x}", timeout=5)
    machine = got["pt_base_machine"]
    check(machine == got["cr3"] & ~0xFFF, f"CR3 {got['cr3']:#x} != pt_base at {machine:#x}")
