"""What the Xen lab's scenarios use inside dom0: the scenario registry and `xl` helpers.

Standard library only (dom0 has Debian's python3, the project's runtime dependencies and the
work tree's src/ on PYTHONPATH). A scenario is a function registered with ``@scenario(name)``
in a module of tests/lab/scenarios/; it passes by returning and fails by raising (``check``
raises ScenarioFailed). The runner destroys every domU between scenarios, so each one starts
from a dom0 alone.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("XENLAB_ROOT", "/opt/xendbg"))
GUESTS = ROOT / "guests"  # built tests/guests/*.elf
CONFIGS = ROOT / "lab" / "guests"  # lab/guests/*.cfg (xl configs)
SRC = ROOT / "src"
LAB = ROOT / "tests" / "lab"  # this kit, xenprobe.py
LONGMODE_BANNER = "xendbg test guest: vcpu 0 up"  # longmode.elf, vCPU 0
PV_BANNER = "xendbg pv guest: vcpu 0 up"  # pv64.elf
CONSOLE_LOGS = Path("/var/log/xen/console")  # xenconsoled --log=guest (lab/init)


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
    stdin: str | None = None,
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
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
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


class ConsoleLog:
    """A domU's PV console as xenconsoled logs it (``guest-NAME.log``, lab/init starts it with
    --log=guest): what PV guests print (their console_io writes need a debug hypervisor)."""

    def __init__(self, name: str) -> None:
        self.path = CONSOLE_LOGS / f"guest-{name}.log"
        self.lines: list[str] = []

    def drain(self) -> list[str]:
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        complete = text.splitlines()[: text.count("\n")]  # a line still being written waits
        new = complete[len(self.lines) :]
        self.lines.extend(new)
        return new

    def wait_for(self, pattern: str, timeout: float, poll: float = 0.5) -> str:
        """The first line (old or new) matching the regex; ScenarioFailed after ``timeout``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            self.drain()
            for line in self.lines[seen:]:
                if rx.search(line):
                    return line
            seen = len(self.lines)
            if time.monotonic() >= deadline:
                raise ScenarioFailed(
                    f"no line matching {pattern!r} in {self.path} in {timeout:.0f} s"
                )
            time.sleep(poll)


def guest_line(domid: int, text: str) -> str:
    """Regex for a guest debug-port (0xe9) line of ``domid`` as Xen logs it, e.g.
    ``(d1) text`` or ``d1: text`` depending on the log prefix."""
    return rf"\(?\bd{domid}\)?:? .*{re.escape(text)}"


@dataclass(frozen=True)
class Guest:
    name: str
    domid: int
    log: XenLog
    console: ConsoleLog | None = None  # PV guests: their xenconsoled log


def clear_console_log(name: str) -> None:
    """Forget what an earlier guest of this name printed (xenconsoled appends)."""
    (CONSOLE_LOGS / f"guest-{name}.log").unlink(missing_ok=True)


def create_guest(
    config: str,
    name: str,
    banner: str,
    *,
    timeout: float = 60.0,
    attempts: int = 2,
    extra: Sequence[str] = (),
    pv_console: bool = False,
) -> Guest:
    """``xl create`` lab/guests/<config> as ``name`` and wait until its console shows
    ``banner`` (Xen's log, or with ``pv_console`` its xenconsoled log); a guest that does not
    boot is destroyed and created once more (TCG flakes)."""
    cfg = CONFIGS / config
    if not cfg.is_file():
        raise LabError(f"no guest config {cfg}")
    failure = ""
    for attempt in range(1, attempts + 1):
        xen_log = XenLog()
        console = None
        if pv_console:
            clear_console_log(name)
            console = ConsoleLog(name)
        proc = run(["xl", "create", str(cfg), f'name="{name}"', *extra], check_rc=False)
        if proc.returncode == 0:
            domid = domid_of(name)
            try:
                if console is not None:
                    console.wait_for(re.escape(banner), timeout)
                else:
                    xen_log.wait_for(guest_line(domid, banner), timeout)
                return Guest(name, domid, xen_log, console)
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


# A crash in ctypes code shows where it happened instead of a bare "segfault".
PY_ENV = {"PYTHONPATH": f"{SRC}:{LAB}", "PYTHONFAULTHANDLER": "1"}


def xendbg(
    *args: str, timeout: float = 120.0, check_rc: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the work tree's xendbg CLI in dom0 (``python3 -m xendbg.frontend.cli``)."""
    return run(
        [sys.executable, "-m", "xendbg.frontend.cli", *args],
        timeout=timeout,
        check_rc=check_rc,
        env=PY_ENV,
        stdin=stdin,
    )


def probe(*args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run tests/lab/xenprobe.py (in its own process) and return what it reported."""
    proc = run([sys.executable, str(LAB / "xenprobe.py"), *args], timeout=timeout, env=PY_ENV)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("PROBE "):
            result: dict[str, Any] = json.loads(line[len("PROBE ") :])
            return result
    raise ScenarioFailed(f"xenprobe {args[0]} reported nothing")


class Background:
    """A long-running command (e.g. ``xendbg serve``) whose output lines are collected by a
    thread; ``stop`` ends it (SIGTERM, then SIGKILL) and echoes its output to the console."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        log("$ " + shlex.join(argv) + " &")
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first output line from index ``start`` on matching the regex."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[start:]:
                if m := rx.search(line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise ScenarioFailed(
                    f"{self.argv[0]} exited ({self.proc.returncode}) before printing "
                    f"{pattern!r}:\n" + "\n".join(self.lines)
                )
            if time.monotonic() >= deadline:
                raise ScenarioFailed(
                    f"no output line matching {pattern!r} in {timeout:.0f} s:\n"
                    + "\n".join(self.lines)
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        log(f"[{shlex.join(self.argv)}: exit status {self.proc.returncode}]")
        for line in self.lines:
            log("  | " + line)
        return self.proc.returncode

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_console(guest: Guest, text: str, timeout: float = 60.0) -> str:
    """A line of the guest's own output (Xen's log, or its PV console) containing ``text``."""
    if guest.console is not None:
        return guest.console.wait_for(re.escape(text), timeout)
    return guest.log.wait_for(guest_line(guest.domid, text), timeout)


def last_counter(guest: Guest) -> int:
    """The last ``counter=0x…`` value the guest printed so far."""
    if guest.console is not None:
        guest.console.drain()
        lines = guest.console.lines
    else:
        guest.log.drain()
        lines = guest.log.lines
    values = [int(m.group(1), 16) for ln in lines if (m := re.search(r"counter=0x(\w+)", ln))]
    check(bool(values), "the guest printed no counter line yet")
    return values[-1]


def code_hashes(guest: Guest, elf: str, report: dict[str, Any] | None = None) -> list[Any]:
    """The guest's executable segments read through its page tables (xenprobe hash, or a
    report that holds one), each checked equal to the image's bytes."""
    segments: list[dict[str, Any]] = (report or probe("hash", guest.name, elf))["segments"]
    check(bool(segments), "no executable segment hashed")
    for seg in segments:
        check(seg["matches_elf"], f"guest code at {seg['vaddr']:#x} differs from {elf}")
    return segments


def verified(guest: Guest, elf: str, before: list[Any] | None = None) -> None:
    """The clean-detach checks (xenprobe verify): the code pages as the image (so as before
    the session: the guests never write their code) and as ``before`` if given, and a second
    full attach succeeds (no monitor ring left behind)."""
    report = probe("verify", guest.name, elf)
    after = code_hashes(guest, elf, report)
    check(before is None or after == before, "code pages changed across the session")
    check(report["reattach"]["ok"] is True, f"second attach: {report['reattach']}")
