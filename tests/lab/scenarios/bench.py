"""``bench-foreign-read``: xendbg's guest-memory reads against a plain C reader making the same
libxenforeignmemory calls, and the single-step round trip (bench/xen/; figures for
docs/PERFORMANCE.md). Under TCG the absolute numbers are slow; the ratios are the point."""

from __future__ import annotations

import json
import sys

from labkit import (
    LONGMODE_BANNER,
    PY_ENV,
    ROOT,
    check,
    create_guest,
    log,
    run,
    scenario,
    wait_console,
)

C_READER = "/tmp/foreign_read"


@scenario("bench-foreign-read", timeout=300)
def bench_foreign_read() -> None:
    src = ROOT / "bench" / "xen" / "foreign_read.c"
    run(["gcc", "-O2", "-Wall", "-o", C_READER, str(src), "-lxenforeignmemory"], timeout=120)
    guest = create_guest("longmode-pvh.cfg", "xenlab-bench", LONGMODE_BANNER)
    wait_console(guest, "vcpu 0 counter=0x")
    bench = str(ROOT / "bench" / "xen" / "xen_bench.py")
    argv = [sys.executable, bench, guest.name, "--c-reader", C_READER, "--steps", "100"]
    out = run(argv, env=PY_ENV, timeout=240).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
    check(line is not None, "xen_bench.py printed no BENCH line")
    assert line is not None
    figures: dict[str, dict[str, float]] = json.loads(line[len("BENCH ") :])
    for size in ("4KiB", "1MiB"):
        ours, c = figures[f"xendbg read_phys {size}"], figures[f"C foreign_read {size}"]
        check(ours["mib_per_s"] > 0 and c["mib_per_s"] > 0, f"{size}: no throughput")
        log(f"{size} reads: xendbg {ours['mib_per_s']:.1f} MiB/s vs C {c['mib_per_s']:.1f} "
            f"MiB/s ({ours['mib_per_s'] / c['mib_per_s']:.0%} of C)")  # fmt: skip
    step = figures["single-step round trip"]["ms_per_step"]
    check(step > 0, "no single-step figure")
    log(f"single-step round trip (TF + DEBUG_EXCEPTION): {step:.2f} ms")
    wait_console(guest, "vcpu 0 counter=0x", timeout=30)  # still running after the bench
