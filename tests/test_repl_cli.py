"""`xendbg repl` as a real process: script mode over stdin, -x files, a pseudo-terminal
(prompt, tab completion, Ctrl-C, history), and gdb's `monitor` in the server."""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from elfsyms import symbols
from serverproc import Server

TIMEOUT = 20.0  # seconds for any single exchange with a child process
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")


def repl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "xendbg.frontend.cli", "repl", *args]


def script(guest: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    return subprocess.run(repl_cmd("--emu", str(guest), *args), input=text, text=True,
                          capture_output=True, timeout=TIMEOUT, env=env)  # fmt: skip


def test_script_over_stdin(guests: Path) -> None:
    elf = guests / "longmode.elf"
    sym = symbols(elf)
    cmds = "\n".join([
        "print $rip",
        "# a comment, then an empty line",
        "",
        "hbreak main_loop",
        "continue -t 10",
        "delete",
        "b tick",
        "continue -t 10",
        "print $rip - &tick",
        "print 1 + nosuch",
        "p/d 6 * 7",
        "quit",
        "print 1",  # never reached: quit ends the script
    ]) + "\n"  # fmt: skip
    res = script(elf, cmds)
    assert res.returncode == 1, res.stderr  # one command failed
    out = res.stdout
    assert "\x1b" not in out and "(xendbg)" not in out  # no colours, no prompt
    lines = out.splitlines()
    assert lines[0].startswith("Loaded ") and "symbols from" in lines[0]
    assert f"{sym['_start']:#x}" in lines
    assert f"Hardware breakpoint 1 at {sym['main_loop']:#x} <main_loop>" in lines
    assert f"Breakpoint 1, {sym['main_loop']:#x} <main_loop>" in lines
    assert f"Breakpoint 2 at {sym['tick']:#x} <tick>" in lines
    assert f"Breakpoint 2, {sym['tick']:#x} <tick>" in lines
    assert "0x0" in lines and "42" in lines
    assert "0x1" not in lines
    assert lines[-1] == "Detached: breakpoints removed, the guest resumed."
    assert res.stderr.splitlines() == [
        "error: no symbol 'nosuch' (load one with `symbol load`)",
        "  1 + nosuch",
        "      ^^^^^^",
    ]


def test_x_file_runs_first_and_stops_at_its_first_error(guests: Path, tmp_path: Path) -> None:
    elf = guests / "longmode.elf"
    cmds = tmp_path / "cmds"
    cmds.write_text("set $a = 5\nprint $a * 2\nbogus\nprint 99\n")
    res = script(elf, "print $a + 1\n", "-x", str(cmds), "--echo")
    out = res.stdout.splitlines()
    assert "(xendbg) print $a * 2" in out and "0xa" in out
    assert "0x63" not in out  # after the error: not run
    assert "0x6" in out  # stdin runs afterwards with the file's variables
    assert res.stderr.splitlines() == [
        f"{cmds}:3: error: unknown command 'bogus' (try `help`)",
        f"{cmds}: stopped at line 3",
    ]
    assert res.returncode == 1


def test_bare_xendbg_is_the_repl_and_bad_guests_are_reported(guests: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "xendbg.frontend.cli", "--emu",
                          str(guests / "longmode.elf")], input="info xen\n", text=True,
                         capture_output=True, timeout=TIMEOUT)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "No Xen hypervisor: this is xendbg's emulated backend" in res.stdout
    res = subprocess.run([sys.executable, "-m", "xendbg.frontend.cli"], input="", text=True,
                         capture_output=True, timeout=TIMEOUT)  # fmt: skip
    assert res.returncode == 1
    # No Xen on this machine: the Xen target says why and points at the emulator.
    err = res.stderr.strip()
    assert err.startswith("xendbg: attaching to Xen domains is not supported: Xen is not "), err
    assert err.endswith("emulate a guest with --emu GUEST.elf instead"), err
    assert "Traceback" not in err
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"junk")
    res = subprocess.run(repl_cmd("--emu", str(junk)), input="", text=True,
                         capture_output=True, timeout=TIMEOUT)  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.startswith("xendbg: ") and "Traceback" not in res.stderr


class Pty:
    """The REPL on a pseudo-terminal that is its controlling terminal (so ^C is SIGINT)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.fd = master
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )  # fmt: skip
        os.close(slave)
        self.seen = ""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait for ``pattern`` in the output (escape codes removed) after what was consumed."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.seen)
            if m:
                self.seen = self.seen[m.end() :]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"EOF waiting for {pattern!r}; got {self.seen!r}")
                self.seen += ANSI.sub("", data.decode("utf-8", "replace"))

    def close(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            raise
        finally:
            os.close(self.fd)


PROMPT = r"\(xendbg\)"


def test_terminal_completion_ctrl_c_history(guests: Path, tmp_path: Path) -> None:
    elf = guests / "longmode.elf"
    sym = symbols(elf)
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "XDG_STATE_HOME")}
    env.update(HOME=str(tmp_path), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    t = Pty(repl_cmd("--emu", str(elf)), env)
    try:
        t.expect(PROMPT)
        # Ctrl-C stops a running `continue` and returns to the prompt, guest paused.
        t.send("continue\r")
        time.sleep(0.5)
        t.send("\x03")
        t.expect(r"Interrupted at 0x[0-9a-f]+")
        t.expect(PROMPT)
        t.send("info guest\r")
        t.expect(r"state\s+stopped \(interrupt\)")
        t.expect(PROMPT)
        # Tab completion: a sub-command, a symbol after '&', a register after '$'.
        t.send("breakpoint cr\t")
        t.expect("breakpoint create")
        t.send(" tick\r")
        t.expect(rf"Breakpoint 1 at {sym['tick']:#x} <tick>")
        t.expect(PROMPT)
        t.send("p &comp\t")
        t.expect("&compute")
        t.send("\r")
        t.expect(rf"\n{sym['compute']:#x}\n")
        t.expect(PROMPT)
        t.send("c\r")
        t.expect(rf"Breakpoint 1, {sym['tick']:#x} <tick>")
        t.expect(PROMPT)
        t.send("p $ri\t")
        t.expect(r"\$rip")
        t.send(" - tick\r")
        t.expect(r"\n0x0\n")
        t.expect(PROMPT)
        # Enter repeats a step, as in GDB.
        t.send("si\r")
        first = int(t.expect(r"(0x[0-9a-f]+) <tick\+0x[0-9a-f]+>").group(1), 16)
        t.expect(PROMPT)
        t.send("\r")
        second = int(t.expect(r"(0x[0-9a-f]+) <tick\+0x[0-9a-f]+>").group(1), 16)
        assert sym["tick"] < first < second
        t.expect(PROMPT)
        # Ctrl-C at the prompt just clears the line.
        t.send("print 12345\x03")
        t.expect(PROMPT)
        t.send("quit\r")
        t.expect("Detached: breakpoints removed, the guest resumed.")
    finally:
        status = t.close()
    assert status == 0
    history = (tmp_path / ".xendbg_history").read_text()
    assert "+breakpoint create tick" in history and "+quit" in history
    assert "print 12345" not in history


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb not installed")
def test_gdb_monitor_runs_repl_commands(guests: Path) -> None:
    elf = guests / "longmode.elf"
    sym = symbols(elf)
    with Server(elf) as srv:
        args = ["gdb", "-nx", "-batch", "-ex", "set confirm off", "-ex",
                f"target remote 127.0.0.1:{srv.port}",
                "-ex", "monitor print &tick + 1", "-ex", "monitor info xen",
                "-ex", "monitor x/2gx 0x10e000", "-ex", "monitor print 1 + nosuch",
                "-ex", "monitor continue", "-ex", "monitor help b"]  # fmt: skip
        res = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT * 2)
    out = res.stdout + res.stderr
    assert f"{sym['tick'] + 1:#x}\n" in out
    assert "No Xen hypervisor: this is xendbg's emulated backend" in out
    # At _start the loader's identity map is live: counter's physical address.
    assert "0x10e000:  0x0000000000000000  0x0000000000000000" in out
    assert "error: no symbol 'nosuch'" in out and "      ^^^^^^" in out
    assert "`continue` is not available through monitor" in out
    assert "usage: breakpoint create [-h] EXPR" in out
