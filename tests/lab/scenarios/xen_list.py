"""`xendbg list` (the Xen backend through frontend/listing.py) against a running PVH guest."""

from __future__ import annotations

import re

from labkit import LONGMODE_BANNER, check, create_guest, scenario, xendbg


@scenario("xen-list", timeout=240)
def xen_list() -> None:
    """Every running domain is listed with its domid and name, the PVH guest included."""
    guest = create_guest("longmode-pvh.cfg", "xenlab-longmode", LONGMODE_BANNER)
    out = xendbg("list").stdout
    for domid, name in ((0, "Domain-0"), (guest.domid, guest.name)):
        row = re.compile(rf"^\s*{domid}\b.*\b{re.escape(name)}\b", re.MULTILINE)
        check(bool(row.search(out)), f"xendbg list shows no row '{domid} … {name}':\n{out}")
