"""``xendbg list``: the Xen domains this dom0 can debug."""

from __future__ import annotations

import argparse
import json
import sys

from xendbg.backend.xen.listing import DomainInfo
from xendbg.errors import XendbgError

HEADER = ("ID", "NAME", "TYPE", "WIDTH", "VCPUS", "MEMORY", "STATE")


def format_table(domains: list[DomainInfo]) -> str:
    """Aligned columns, one domain per line, as ``xl list`` does."""
    rows = [HEADER] + [
        (
            str(d.domid),
            d.name or "-",
            d.guest_type.value.upper(),
            f"{d.word_size * 8}-bit" if d.word_size else "?",
            f"{d.vcpus}/{d.max_vcpus}",
            f"{d.memory_kib // 1024} MiB",
            d.state,
        )
        for d in domains
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def as_json(domains: list[DomainInfo]) -> str:
    return json.dumps(
        [
            {
                "domid": d.domid,
                "name": d.name,
                "type": d.guest_type.value,
                "word_size": d.word_size,
                "vcpus": d.vcpus,
                "max_vcpus": d.max_vcpus,
                "memory_kib": d.memory_kib,
                "state": d.state,
            }
            for d in domains
        ],
        indent=2,
    )


def cmd_list(args: argparse.Namespace) -> int:
    """Print the domains; exit status 1 with the reason when Xen is not reachable."""
    from xendbg.backend.xen.listing import list_domains
    from xendbg.backend.xen.xenctrl import XenCtrl
    from xendbg.backend.xen.xenstore import XenStore

    try:
        with XenCtrl() as xc:
            try:
                xs: XenStore | None = XenStore()
            except XendbgError:
                xs = None  # no xenstored: list without names
            try:
                domains = list_domains(xc, xs)
            finally:
                if xs is not None:
                    xs.close()
    except XendbgError as exc:
        print(f"xendbg list: {exc}", file=sys.stderr)
        return 1
    print(as_json(domains) if getattr(args, "json", False) else format_table(domains))
    return 0
