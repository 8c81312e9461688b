"""``pvh-single-step``: single-stepping a PVH guest through the engine (Session.step).

Xen offers MTF single-step only on Intel VMX; under the lab's emulated AMD SVM the monitor
capability bitmap lacks SINGLESTEP, so the engine must step with RFLAGS.TF and
DEBUG_EXCEPTION events. Every step must land where the instruction it executed goes, as
capstone decodes it from the guest's ELF.
"""

from __future__ import annotations

from labkit import GUESTS, LONGMODE_BANNER, check, create_guest, log, probe, scenario

STEPS = 40
XEN_DOMCTL_MONITOR_EVENT_SINGLESTEP = 2  # domctl.h
XEN_DOMCTL_MONITOR_EVENT_DEBUG_EXCEPTION = 5


@scenario("pvh-single-step", timeout=300)
def pvh_single_step() -> None:
    guest = create_guest("longmode-pvh.cfg", "xenlab-step", LONGMODE_BANNER)
    got = probe("step", guest.name, str(GUESTS / "longmode.elf"), str(STEPS))
    bitmap = got["monitor_capabilities"]
    log(f"monitor capabilities {bitmap:#x}; xendbg capabilities {got['capabilities']}")
    check(not bitmap >> XEN_DOMCTL_MONITOR_EVENT_SINGLESTEP & 1,
          f"SINGLESTEP (MTF) offered under emulated SVM? bitmap {bitmap:#x}")  # fmt: skip
    check(bool(bitmap >> XEN_DOMCTL_MONITOR_EVENT_DEBUG_EXCEPTION & 1), "no DEBUG_EXCEPTION")
    check("SINGLESTEP" not in got["capabilities"], "SINGLESTEP capability without MTF")
    log("MTF single-step is not available here (no SINGLESTEP in the bitmap): TF + #DB events")
    steps = got["steps"]
    check(len(steps) == STEPS, f"{len(steps)} steps of {STEPS}")
    for i, s in enumerate(steps):
        log(f"step {i:2}: {s['rip']:#x} {s['at']:<16} {s['insn']:<36} -> {s['next']:#x}")
        check(s["reason"] == "step", f"step {i} stopped for {s['reason']}")
        check(s["ok"], f"step {i}: {s['insn']} at {s['at']} went to {s['next']:#x}")
        if i:
            check(s["rip"] == steps[i - 1]["next"], f"step {i} did not start where {i - 1} ended")
    visited = {s["at"].split("+")[0] for s in steps}
    check({"main_loop", "tick"} <= visited, f"the steps did not go round the loop: {visited}")
    log(f"{got['seconds_per_step'] * 1000:.1f} ms per step")
    check("p" not in got["state_detached"], f"paused after detach: {got['state_detached']}")
