"""Host driver of the Xen lab: boots Debian's Xen 4.17 + a Debian dom0 under QEMU (TCG), runs
the in-dom0 scenarios (labrunner.py) and writes build/xenlab/{report.json,console.log}.

    python tests/lab/xenlab.py [--only NAME ...] [--build-only] [--rebuild] [--cache DIR]

The initrd dom0 boots from is three concatenated cpio archives:

1. the Debian image (lab/build-image.sh: Xen, dom0 kernel, toolstack, python3, gdb), cached
   under a key made of the package list, the packages' candidate versions, the apt sources
   and the build script;
2. the project's Python runtime dependencies (pip, for dom0's Python version), cached under a
   key made of pyproject's dependencies and constraints.txt;
3. a per-run overlay: /init (lab/init), src/, tests/lab/, bench/, the built guests and
   lab/guests/.

So the slow part is built once per machine and package update, the work tree is fresh each run.
Exit status: 0 when every scenario passed, 1 when one failed, 2 when the lab itself broke.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import labproto
from labcpio import Archive
from labproto import FAILED, PASSED, Console, Result

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
OUT = REPO / "build" / "xenlab"
GUESTS = REPO / "build" / "guests"
DOM0_PYTHON = "3.11"  # Debian bookworm's python3, which runs the suite in dom0
NOT_IN_DOM0 = {"unicorn"}  # the emulated backend's engine: dom0 debugs real domains

# spec-ctrl=eager-fpu: with Xen's lazy FPU switching (its default on AMD, which the emulated CPU
# is), dom0 processes crashed at random (heap corruption, SIGSEGV) while a domU ran, about one
# Python process in ten; eager switching avoids the emulated CR0.TS/#NM path (docs/xen-lab.md).
XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M loglvl=all guest_loglvl=all noreboot "
    "spec-ctrl=eager-fpu"
)
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen rdinit=/init"
# -smap: PV dom0 page-faults at once with it; -rdtscp: PVH guests loop on SVM instruction-length
# emulation of rdtscp (shared/notes/xen-lab.md). Xen then sees AMD SVM with nested paging.
QEMU = [
    "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-cpu", "max,-smap,-rdtscp",
    "-smp", "2", "-m", "4G", "-nographic", "-serial", "stdio", "-monitor", "none",
    "-net", "none", "-no-reboot",
]  # fmt: skip
XEN_BANNER = re.compile(r"\(XEN\) Xen version (\d+\.\d+\S*)")  # fallback for report.json
XEN_DIED = re.compile(r"Panic on CPU|Reboot in five seconds|Kernel panic - not syncing")


class LabBroken(Exception):
    """The lab (image build, QEMU, Xen, dom0 toolstack) failed, not the project."""


@dataclass(frozen=True)
class Timeouts:
    to_init: float = 300.0  # QEMU start -> dom0 /init (25-60 s measured, slower under load)
    to_toolstack: float = 120.0  # /init -> xenstored & co up
    per_scenario: float = 900.0  # host-side backstop; dom0 enforces each scenario's own
    to_poweroff: float = 60.0  # suite end -> QEMU exit
    total: float = 3600.0


# ---------------------------------------------------------------------------------- image


def default_cache() -> Path:
    if env := os.environ.get("XENDBG_LAB_CACHE"):
        return Path(env)
    system = Path("/var/cache/xendbg-lab")
    if os.geteuid() == 0:
        return system
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "xendbg-lab"


def apt_sources() -> Path:
    """The host's Debian apt sources, reused for the image (bookworm + updates + security)."""
    if env := os.environ.get("XENDBG_LAB_SOURCES"):
        return Path(env)
    for candidate in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        if Path(candidate).is_file():
            return Path(candidate)
    raise LabBroken("no apt sources found; set XENDBG_LAB_SOURCES to a sources file")


def read_packages(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        names.extend(line.split("#", 1)[0].split())
    return names


def parse_candidates(policy: str) -> dict[str, str]:
    """Candidate versions from ``apt-cache policy`` output."""
    versions: dict[str, str] = {}
    package = None
    for line in policy.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            package = line[:-1]
        elif package and line.strip().startswith("Candidate:"):
            versions[package] = line.split(":", 1)[1].strip()
    return versions


def candidate_versions(packages: Sequence[str], stamp: Path) -> dict[str, str]:
    """The versions an image built now would get, from apt's lists. The lab refreshes them
    when its own ``stamp`` is older than a day, so the key follows Debian's updates; a failed
    refresh keeps the old lists."""
    fresh = stamp.is_file() and time.time() - stamp.stat().st_mtime < 86400
    if os.geteuid() == 0 and not fresh:
        print("lab: apt-get update (the lab's package lists are over a day old)", flush=True)
        if subprocess.run(["apt-get", "update", "-qq"], check=False).returncode == 0:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.touch()
    out = subprocess.run(
        ["apt-cache", "policy", *packages], capture_output=True, text=True, check=False
    ).stdout
    versions = parse_candidates(out)
    missing = [p for p in packages if versions.get(p, "(none)") == "(none)"]
    if missing:
        raise LabBroken(f"apt knows no candidate for {missing} (apt sources? apt-get update?)")
    return versions


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def image_key(script: bytes, versions: dict[str, str], sources: str) -> str:
    return digest(
        {"script": hashlib.sha256(script).hexdigest(), "packages": versions, "sources": sources}
    )


def runtime_requirements(pyproject: Path) -> list[str]:
    """pyproject's runtime dependencies that dom0 needs (all but the emulator's)."""
    deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] not in NOT_IN_DOM0]


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One builder at a time per cache (CI and a developer may share a machine)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prune(cache: Path, prefix: str, keep: Path) -> None:
    """Drop older cached entries of one kind (each image is ~300 MB)."""
    for old in cache.glob(prefix + "*"):
        if old != keep and not old.name.endswith(".lock"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def ensure_image(cache: Path, rebuild: bool = False) -> Path:
    script = LAB / "build-image.sh"
    packages = read_packages(LAB / "packages.txt")
    sources = apt_sources()
    versions = candidate_versions(packages, cache / "apt-update.stamp")
    key = image_key(script.read_bytes(), versions, sources.read_text())
    image = cache / f"image-{key}"
    with locked(cache):
        if (image / "dom0.cpio").is_file() and not rebuild:
            return image
        print(f"lab: building the dom0 image {image.name} (Debian packages, ~1-3 min)", flush=True)
        start = time.monotonic()
        log = OUT / "image-build.log"
        with open(log, "w") as out:
            proc = subprocess.run(
                ["sh", str(script), str(image), str(sources), str(LAB / "packages.txt")],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0:
            raise LabBroken(f"image build failed (status {proc.returncode}); see {log}")
        size = (image / "dom0.cpio").stat().st_size
        print(f"lab: image built in {time.monotonic() - start:.0f} s, {size >> 20} MiB", flush=True)
        prune(cache, "image-", image)
    return image


def ensure_pydeps(cache: Path) -> Path:
    requirements = runtime_requirements(REPO / "pyproject.toml")
    constraints = REPO / "constraints.txt"
    key = digest(
        {"requirements": requirements, "constraints": constraints.read_text(), "py": DOM0_PYTHON}
    )
    archive = cache / f"pydeps-{key}.cpio"
    with locked(cache):
        if archive.is_file():
            return archive
        print(f"lab: installing {requirements} for dom0's Python {DOM0_PYTHON}", flush=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            site = Path(tmp, "site")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--target", str(site),
                 "--python-version", DOM0_PYTHON, "--only-binary=:all:",
                 "-c", str(constraints), *requirements],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise LabBroken(f"pip install of dom0's dependencies failed:\n{proc.stderr}")
            partial = archive.with_suffix(".part")
            with open(partial, "wb") as out:
                cpio = Archive(out)
                cpio.tree(site, f"usr/local/lib/python{DOM0_PYTHON}/dist-packages")
                cpio.close()
            partial.rename(archive)
        prune(cache, "pydeps-", archive)
    return archive


def write_overlay(path: Path, only: Sequence[str]) -> None:
    """The per-run archive: /init and the work tree's code, guests and lab config."""

    def code(p: Path) -> bool:
        return "__pycache__" not in p.parts and p.suffix != ".pyc"

    with open(path, "wb") as out:
        cpio = Archive(out)
        cpio.file("init", (LAB / "init").read_bytes(), 0o755)
        cpio.tree(REPO / "src", "opt/xendbg/src", code)
        cpio.tree(REPO / "tests" / "lab", "opt/xendbg/tests/lab", code)
        cpio.tree(REPO / "bench", "opt/xendbg/bench", code)  # bench-foreign-read builds bench/xen
        cpio.tree(LAB / "guests", "opt/xendbg/lab/guests")
        if cpio.tree(GUESTS, "opt/xendbg/guests", lambda p: p.suffix == ".elf") == 0:
            raise LabBroken(f"no guests in {GUESTS}: run `make guests`")
        cpio.file("opt/xendbg/lab.json", json.dumps({"only": list(only)}).encode())
        cpio.close()


def concatenate(target: Path, parts: Sequence[Path]) -> None:
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)


# ---------------------------------------------------------------------------------- run


@dataclass
class Run:
    console: Console = field(default_factory=Console)
    lab_error: str | None = None
    wall: float = 0.0


def qemu_command(image: Path, initrd: Path) -> list[str]:
    return [
        *QEMU,
        "-kernel", str(image / "xen"),
        "-append", XEN_CMDLINE,
        # Multiboot modules: a comma separates them, so none may appear in their arguments.
        "-initrd", f"{image / 'vmlinuz'} {DOM0_CMDLINE},{initrd}",
    ]  # fmt: skip


def watch(proc: subprocess.Popen[bytes], log: Path, timeouts: Timeouts) -> Run:
    """Follow QEMU's serial console until dom0 powers off or a deadline passes."""
    run = Run()
    con = run.console
    assert proc.stdout is not None
    start = time.monotonic()
    deadline = start + timeouts.to_init
    waiting_for = f"dom0 did not reach /init within {timeouts.to_init:.0f} s"
    buffer = b""
    with selectors.DefaultSelector() as sel, open(log, "ab") as out:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            limit = min(deadline, start + timeouts.total)
            if now >= limit:
                run.lab_error = waiting_for if now >= deadline else "whole run over time limit"
                break
            if not sel.select(timeout=min(5.0, limit - now)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                kind = con.feed(line)
                if banner := XEN_BANNER.search(line):
                    con.info.setdefault("xen_version", banner.group(1))
                if XEN_DIED.search(line) and not con.ended:
                    run.lab_error = f"crash on the console: {line.strip()}"
                now = time.monotonic()
                if kind == labproto.INIT:
                    print(f"lab: dom0 /init reached after {now - start:.0f} s", flush=True)
                    deadline = now + timeouts.to_toolstack
                    waiting_for = f"toolstack not up {timeouts.to_toolstack:.0f} s after /init"
                elif kind in (labproto.TOOLSTACK, labproto.BEGIN):
                    deadline = now + timeouts.per_scenario
                    waiting_for = f"no scenario result within {timeouts.per_scenario:.0f} s"
                    if kind == labproto.BEGIN:
                        print(f"lab: scenario {con.current} …", flush=True)
                elif kind == labproto.RESULT:
                    last = list(con.results.values())[-1]
                    print(f"lab:   {last.outcome} ({last.seconds:.0f} s)", flush=True)
                elif kind == labproto.END:
                    deadline = now + timeouts.to_poweroff
                    waiting_for = "dom0 did not power off"
                elif kind == labproto.LAB_ERROR:
                    print(f"lab: dom0 reports: {con.lab_errors[-1]}", flush=True)
            if run.lab_error and not con.ended:
                break
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    run.wall = time.monotonic() - start
    if con.ended and run.lab_error == "dom0 did not power off":
        run.lab_error = None  # results are complete; QEMU was just slow to go
    if run.lab_error is None:
        if con.lab_errors:
            run.lab_error = "dom0: " + "; ".join(con.lab_errors)
        elif not con.reached_init:
            run.lab_error = f"QEMU exited (status {proc.returncode}) before dom0 reached /init"
        elif not con.ended:
            run.lab_error = f"QEMU exited (status {proc.returncode}) before the suite ended"
    return run


def boot(image: Path, initrd: Path, log: Path, timeouts: Timeouts) -> Run:
    cmd = qemu_command(image, initrd)
    with open(log, "ab") as out:
        out.write(("\n#### " + " ".join(cmd) + "\n").encode())
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        return watch(proc, log, timeouts)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------- report


def collect(run: Run) -> list[Result]:
    """Every scenario's result; one that began but never reported failed with the lab."""
    results = run.console.final_results()
    seen = {r.name for r in results}
    current = run.console.current
    if current and current not in seen:
        why = run.lab_error or "no result reported"
        results.append(Result(current, FAILED, 0.0, f"lab: {why}"))
    return results


def report(run: Run, image: Path, path: Path) -> dict[str, Any]:
    data = {
        "xen_version": run.console.info.get("xen_version"),
        "lab_error": run.lab_error,
        "image": image.name,
        "wall_seconds": round(run.wall, 1),
        "tests": [r.as_dict() for r in collect(run)],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def exit_status(data: dict[str, Any]) -> int:
    if data["lab_error"] or not data["tests"]:
        return 2
    return 0 if all(t["outcome"] == PASSED for t in data["tests"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="run only these scenarios")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--build-only", action="store_true", help="build/cache the image, stop")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached image")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        image = ensure_image(args.cache, args.rebuild)
        pydeps = ensure_pydeps(args.cache)
    except LabBroken as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2
    if args.build_only:
        print(f"lab: image {image}, dependencies {pydeps}")
        return 0
    log = OUT / "console.log"
    log.write_bytes(b"")
    with tempfile.TemporaryDirectory(prefix="xenlab-") as tmp:
        overlay, initrd = Path(tmp, "overlay.cpio"), Path(tmp, "initrd.cpio")
        try:
            write_overlay(overlay, args.only)
        except LabBroken as exc:
            print(f"lab: {exc}", file=sys.stderr)
            return 2
        concatenate(initrd, [image / "dom0.cpio", pydeps, overlay])
        print(f"lab: booting Xen + dom0 under QEMU (TCG); console in {log}", flush=True)
        run = boot(image, initrd, log, Timeouts())
        if not run.console.reached_init:  # nothing of the project ran yet: one more try
            print(f"lab: {run.lab_error}; booting once more", flush=True)
            run = boot(image, initrd, log, Timeouts())
    data = report(run, image, OUT / "report.json")
    for test in data["tests"]:
        print(f"lab: {test['outcome']:6} {test['name']:24} {test['seconds']:6.1f} s  "
              f"{test['detail'].splitlines()[-1] if test['detail'] else ''}")  # fmt: skip
    if run.lab_error:
        print(f"lab: {run.lab_error} (the lab broke, not necessarily the project); "
              f"see {log}", file=sys.stderr)  # fmt: skip
    passed = sum(t["outcome"] == PASSED for t in data["tests"])
    print(f"xenlab: {passed} passed, {len(data['tests']) - passed} failed")
    return exit_status(data)


if __name__ == "__main__":
    sys.exit(main())
