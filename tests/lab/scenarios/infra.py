"""Scenarios that prove the lab itself works (no project code involved)."""

from __future__ import annotations

from pathlib import Path

from labkit import (
    LONGMODE_BANNER,
    check,
    create_guest,
    domains,
    guest_line,
    log,
    scenario,
    xl_info,
)


@scenario("lab-boot", timeout=60, infra=True)
def lab_boot() -> None:
    """Xen 4.17 runs with HVM and HAP available, and this dom0 is its control domain."""
    info = xl_info()
    log(f"xen {info.get('xen_version')} virt_caps: {info.get('virt_caps')}")
    check(info.get("xen_major") == "4" and info.get("xen_minor") == "17", f"not Xen 4.17: {info}")
    caps = info.get("virt_caps", "").split()
    for cap in ("pv", "hvm", "hap"):
        check(cap in caps, f"virt_caps lacks {cap}: {caps}")
    check("control_d" in Path("/proc/xen/capabilities").read_text(), "dom0 is not control_d")
    check([d.domid for d in domains()] == [0], f"domains other than dom0: {domains()}")


@scenario("pvh-guest-console", timeout=240, infra=True)
def pvh_guest_console() -> None:
    """The PVH longmode guest boots under xl and its debug-port output reaches Xen's log."""
    guest = create_guest("longmode-pvh.cfg", "xenlab-longmode", LONGMODE_BANNER)
    for text in ("boot: pvh start_info=", "hh_data: HIGHHALF-MARKER", "vcpu 0 counter=0x"):
        line = guest.log.wait_for(guest_line(guest.domid, text), timeout=60)
        log(f"seen: {line}")
    names = {d.name: d.domid for d in domains()}
    check(names.get("xenlab-longmode") == guest.domid, f"xl list: {names}")
