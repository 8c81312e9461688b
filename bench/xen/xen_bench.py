"""Guest-memory read throughput and single-step latency of xendbg on real Xen (run in dom0).

    python3 bench/xen/xen_bench.py NAME_OR_ID [--c-reader PATH] [--steps N]

Compares, on the same frames of an HVM/PVH guest, xendbg's ``XenDomain.read_phys`` with
``foreign_read`` (bench/xen/foreign_read.c: the same libxenforeignmemory calls from C), for
4 KiB and 1 MiB reads; adds ``Session.read_memory`` (the page walk with the guest's CR3 on
top) and the round trip of one single-step (RFLAGS.TF + a DEBUG_EXCEPTION event where there
is no MTF).  Prints a table and one ``BENCH {json}`` line.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from xendbg.backend.xen.domain import XenDomain, attach
from xendbg.engine.session import Session

PAGE = 4096
FIRST_FRAME = 0x100  # 1 MiB: where the test guests are loaded
SIZES = {"4KiB": (1, 500), "1MiB": (256, 20)}  # pages per read, reads


def c_reader(path: str, domid: int, pages: int, reads: int) -> dict[str, float]:
    out = subprocess.run(
        [path, str(domid), hex(FIRST_FRAME), str(pages), str(reads)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = dict(item.split("=", 1) for item in out.split())
    return {"mib_per_s": float(fields["mib_per_s"]), "us_per_read": float(fields["us_per_read"])}


def timed(fn: Callable[[], object], reads: int, nbytes: int) -> dict[str, float]:
    start = time.perf_counter()
    for _ in range(reads):
        fn()
    seconds = time.perf_counter() - start
    return {
        "mib_per_s": reads * nbytes / seconds / (1 << 20),
        "us_per_read": seconds / reads * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain")
    parser.add_argument("--c-reader", help="path of the built foreign_read")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--virtual", type=lambda s: int(s, 0), help="a mapped guest address")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    handle = attach(args.domain, events=False)
    try:
        gpa = FIRST_FRAME * PAGE
        for label, (pages, reads) in SIZES.items():
            nbytes = pages * PAGE
            read = functools.partial(handle.read_phys, gpa, nbytes)
            results[f"xendbg read_phys {label}"] = timed(read, reads, nbytes)
            if args.c_reader:
                results[f"C foreign_read {label}"] = c_reader(
                    args.c_reader, handle.domid, pages, reads
                )
    finally:
        handle.close()
    dom: XenDomain = attach(args.domain)
    try:
        session = Session(dom)
        try:
            addr = args.virtual if args.virtual is not None else session.pc(0) & ~(PAGE - 1)
            results["xendbg Session.read_memory 4KiB"] = timed(
                lambda: session.read_memory(0, addr, PAGE), SIZES["4KiB"][1], PAGE
            )
            start = time.perf_counter()
            for _ in range(args.steps):
                session.step(0)
            per_step = (time.perf_counter() - start) / args.steps
            results["single-step round trip"] = {"ms_per_step": per_step * 1e3}
        finally:
            session.detach()
    finally:
        dom.close()
    width = max(len(k) for k in results)
    for name, figures in results.items():
        text = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
        print(f"{name:<{width}}  {text}")
    print("BENCH " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
