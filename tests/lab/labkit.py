"""What the Xen lab's scenarios use inside dom0: the scenario registry and `xl` helpers.

Standard library only (dom0 has Debian's python3, the project's runtime dependencies and the
work tree's src/ on PYTHONPATH). A scenario is a function registered with ``@scenario(name)``
in a module of tests/lab/scenarios/; it passes by returning and fails by raising (``check``
raises ScenarioFailed). The runner destroys every domU between scenarios, so each one starts
from a dom0 alone.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(os.environ.get("XENLAB_ROOT", "/opt/xendbg"))
GUESTS = ROOT / "guests"  # built tests/guests/*.elf
CONFIGS = ROOT / "lab" / "guests"  # lab/guests/*.cfg (xl configs)
SRC = ROOT / "src"
LONGMODE_BANNER = "xendbg test guest: vcpu 0 up"  # longmode.elf, vCPU 0


class ScenarioFailed(AssertionError):
    """The project (or what the scenario checks) misbehaved."""


class LabError(RuntimeError):
    """The lab itself misbehaved (a tool missing, the toolstack down), not the project."""


ScenarioFunc = Callable[[], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    func: ScenarioFunc
    timeout: float
    infra: bool  # checks the lab itself: run first; its failure means a broken lab


REGISTRY: dict[str, Scenario] = {}


def scenario(
    name: str, *, timeout: float = 300.0, infra: bool = False
) -> Callable[[ScenarioFunc], ScenarioFunc]:
    """Register a scenario under ``name`` (unique: a duplicate is a programming error)."""

    def register(func: ScenarioFunc) -> ScenarioFunc:
        if name in REGISTRY:
            raise ValueError(f"scenario {name!r} registered twice")
        REGISTRY[name] = Scenario(name, func, timeout, infra)
        return func

    return register


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailed(message)


def log(text: str) -> None:
    print(text, flush=True)


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120.0,
    check_rc: bool = True,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command, echo it and its output to the console (the host keeps the log)."""
    log("$ " + shlex.join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not installed in dom0") from exc
    except subprocess.TimeoutExpired as exc:
        raise ScenarioFailed(f"{shlex.join(argv)}: no exit within {timeout:.0f} s") from exc
    if not quiet:
        for stream in (proc.stdout, proc.stderr):
            if stream:
                log(stream.rstrip("\n"))
    if check_rc and proc.returncode != 0:
        raise ScenarioFailed(f"{shlex.join(argv)}: exit status {proc.returncode}")
    return proc


def xl_info() -> dict[str, str]:
    """``xl info`` as a dict of its ``key : value`` lines."""
    out = run(["xl", "info"], quiet=True).stdout
    info: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def xen_version() -> str:
    info = xl_info()
    return f"{info.get('xen_major', '?')}.{info.get('xen_minor', '?')}{info.get('xen_extra', '')}"


@dataclass(frozen=True)
class DomainInfo:
    name: str
    domid: int


def domains() -> list[DomainInfo]:
    """Running domains, dom0 included (from ``xl list``)."""
    out = run(["xl", "list"], quiet=True).stdout
    found = []
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            found.append(DomainInfo(fields[0], int(fields[1])))
    return found


def destroy_domus() -> None:
    for dom in domains():
        if dom.domid != 0:
            run(["xl", "destroy", str(dom.domid)], check_rc=False)


class XenLog:
    """Xen's console ring, read with ``xl dmesg -c`` (read and clear) so it cannot wrap away
    lines between reads; everything read is kept in ``lines``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.drain()
        self.lines.clear()

    def drain(self) -> list[str]:
        new = run(["xl", "dmesg", "-c"], quiet=True).stdout.splitlines()
        self.lines.extend(new)
        return new

    def wait_for(self, pattern: str, timeout: float, poll: float = 0.5) -> str:
        """The first line (old or new) matching the regex; ScenarioFailed after ``timeout``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if rx.search(line):
                    return line
            seen = len(self.lines)
            if time.monotonic() >= deadline:
                raise ScenarioFailed(f"no Xen console line matching {pattern!r} in {timeout:.0f} s")
            time.sleep(poll)
            self.drain()


def guest_line(domid: int, text: str) -> str:
    """Regex for a guest debug-port (0xe9) line of ``domid`` as Xen logs it, e.g.
    ``(d1) text`` or ``d1: text`` depending on the log prefix."""
    return rf"\(?\bd{domid}\)?:? .*{re.escape(text)}"


@dataclass(frozen=True)
class Guest:
    name: str
    domid: int
    log: XenLog


def create_guest(
    config: str,
    name: str,
    banner: str,
    *,
    timeout: float = 60.0,
    attempts: int = 2,
    extra: Sequence[str] = (),
) -> Guest:
    """``xl create`` lab/guests/<config> as ``name`` and wait until its console shows
    ``banner``; a guest that does not boot is destroyed and created once more (TCG flakes)."""
    cfg = CONFIGS / config
    if not cfg.is_file():
        raise LabError(f"no guest config {cfg}")
    failure = ""
    for attempt in range(1, attempts + 1):
        xen_log = XenLog()
        proc = run(["xl", "create", str(cfg), f'name="{name}"', *extra], check_rc=False)
        if proc.returncode == 0:
            domid = domid_of(name)
            try:
                xen_log.wait_for(guest_line(domid, banner), timeout)
                return Guest(name, domid, xen_log)
            except ScenarioFailed as exc:
                failure = str(exc)
        else:
            failure = f"xl create {config}: exit status {proc.returncode}"
        log(f"guest {name} did not boot (attempt {attempt}/{attempts}): {failure}")
        destroy_domus()
    raise ScenarioFailed(f"guest {name} did not boot in {attempts} attempts: {failure}")


def domid_of(name: str) -> int:
    out = run(["xl", "domid", name], quiet=True).stdout.strip()
    if not out.isdigit():
        raise ScenarioFailed(f"xl domid {name}: {out!r}")
    return int(out)


def xendbg(
    *args: str, timeout: float = 120.0, check_rc: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the work tree's xendbg CLI in dom0 (``python3 -m xendbg.frontend.cli``)."""
    return run(
        [sys.executable, "-m", "xendbg.frontend.cli", *args],
        timeout=timeout,
        check_rc=check_rc,
        env={"PYTHONPATH": str(SRC)},
    )
