"""The REPL front-end: an interactive prompt (prompt_toolkit), a script mode for
non-terminal stdin and ``-x FILE``, and gdb's ``monitor`` over the same registry.

Interactive: completion from the registry, persistent history, Enter repeats a
step/next/continue (as in GDB), Ctrl-C at the prompt clears the line and during
``continue`` stops the guest.  Script mode: one command per line, no prompt and
no colour; errors go to stderr and make the exit status 1.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from rich.console import Console

from xendbg.engine.session import Session
from xendbg.errors import XendbgError
from xendbg.frontend.repl.commands import REGISTRY, execute
from xendbg.frontend.repl.completion import complete
from xendbg.frontend.repl.debugger import Debugger
from xendbg.frontend.repl.symbols import SymbolTable
from xendbg.frontend.repl.target import Target

PROMPT = "(xendbg) "


def history_path() -> Path:
    """``$XDG_STATE_HOME/xendbg/history`` when XDG_STATE_HOME is set, else ~/.xendbg_history."""
    state = os.environ.get("XDG_STATE_HOME")
    if state:
        return Path(state) / "xendbg" / "history"
    return Path.home() / ".xendbg_history"


def use_color(no_color_flag: bool, interactive: bool, stream: TextIO) -> bool:
    if no_color_flag or os.environ.get("NO_COLOR"):
        return False
    return interactive and stream.isatty()


def make_console(stream: TextIO, color: bool) -> Console:
    if color:
        return Console(file=stream, highlight=False, soft_wrap=True)
    # No terminal codes at all (not even bold) in scripts and with NO_COLOR.
    # soft_wrap: a script's reader wants whole lines, not 80-column wrapping.
    return Console(
        file=stream,
        highlight=False,
        color_system=None,
        force_terminal=False,
        no_color=True,
        soft_wrap=True,
    )


class DebuggerNames:
    """Completion names (xendbg.frontend.repl.completion.Names) from a live Debugger."""

    def __init__(self, dbg: Debugger) -> None:
        self.dbg = dbg

    def symbol_names(self) -> Iterable[str]:
        return self.dbg.symbols.names()

    def register_names(self) -> Iterable[str]:
        if not self.dbg.attached or self.dbg.session.running:
            return []
        return self.dbg.names.names()

    def variable_names(self) -> Iterable[str]:
        return list(self.dbg.variables)


@dataclass(slots=True)
class Repl:
    dbg: Debugger
    err: Console
    echo: bool = False
    failures: int = 0

    def run_line(self, line: str, *, where: str = "") -> bool:
        """Execute one line; False if it failed (the error is printed)."""
        if self.echo and line.strip():
            shown = line.strip() if line.lstrip().startswith("#") else PROMPT + line.strip()
            self.dbg.out.print(shown, highlight=False, markup=False)
        try:
            execute(self.dbg, line)
        except XendbgError as e:
            self.failures += 1
            self.err.print(f"{where}error: {e}", highlight=False, markup=False)
            return False
        except KeyboardInterrupt:
            self.err.print("Interrupted.", highlight=False)
            return False
        return True

    def run_script(self, lines: Iterable[str], name: str, *, stop_on_error: bool) -> None:
        for n, line in enumerate(lines, 1):
            if self.dbg.quit_requested:
                return
            where = f"{name}:{n}: " if name else ""
            if not self.run_line(line, where=where) and stop_on_error:
                self.err.print(f"{name}: stopped at line {n}", highlight=False, markup=False)
                return

    def interactive(self) -> None:
        path = history_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        session: PromptSession[str] = PromptSession(
            history=FileHistory(str(path)),
            completer=PromptCompleter(self.dbg),
            complete_while_typing=False,
        )
        last = ""
        while not self.dbg.quit_requested:
            try:
                line = session.prompt(PROMPT)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not line.strip() and last:
                line = last  # GDB: Enter repeats a step or continue
            self.run_line(line)
            last = line if _repeatable(line) else ""


def _repeatable(line: str) -> bool:
    try:
        cmd, _ = REGISTRY.resolve(line)
    except XendbgError:
        return False
    return cmd.runs_guest


class PromptCompleter(Completer):
    """prompt_toolkit adapter around the pure ``complete`` function."""

    def __init__(self, dbg: Debugger) -> None:
        self.names = DebuggerNames(dbg)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        before = document.text_before_cursor
        start, words = complete(REGISTRY, before, self.names)
        for w in words:
            yield Completion(w, start_position=start - len(before))


def run(
    target: Target,
    *,
    symbol_files: Iterable[str] = (),
    scripts: Iterable[str] = (),
    no_color: bool = False,
    echo: bool = False,
    attach: str | None = None,
    breakpoints: str = "auto",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The `xendbg repl` main loop.  Returns the exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    interactive = stdin.isatty() and stdout.isatty()
    color = use_color(no_color, interactive, stdout)
    out = make_console(stdout, color)
    err = make_console(stderr, use_color(no_color, interactive, stderr))
    dbg = Debugger(out, target=target, breakpoints=breakpoints)
    repl = Repl(dbg, err, echo=echo)
    try:
        for path in symbol_files:
            try:
                n = dbg.symbols.load(path)
                out.print(f"Loaded {n} symbols from {path}.", highlight=False, markup=False)
            except XendbgError as e:
                err.print(f"warning: {e}", highlight=False, markup=False)
        dbg.attach(attach)
        d = dbg.session.domain
        out.print(
            f"Attached to domain {d.domid} ({d.name}), {d.vcpu_count} vCPU(s); "
            "the guest is paused.  `help` lists commands.",
            highlight=False,
            markup=False,
        )
        dbg.after_stop(dbg.session.stop)
        for script in scripts:
            try:
                lines = Path(script).read_text().splitlines()
            except OSError as e:
                err.print(f"error: {script}: {e.strerror}", highlight=False, markup=False)
                repl.failures += 1
                continue
            repl.run_script(lines, script, stop_on_error=True)
        if not dbg.quit_requested:
            if interactive:
                repl.interactive()
            else:
                repl.run_script(_lines(stdin), "", stop_on_error=False)
    finally:
        attached = dbg.attached
        dbg.close()
        if attached:
            out.print("Detached: breakpoints removed, the guest resumed.", highlight=False)
    return 1 if repl.failures else 0


def _lines(stream: TextIO) -> Iterator[str]:
    while True:
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\n")


MonitorFn = Callable[[str], str]


def monitor_factory(symbol_files: Iterable[str] = ()) -> Callable[[Session], MonitorFn]:
    """For the gdb server: each client session gets a Debugger whose output is
    captured, so `monitor CMD` answers with exactly what the REPL would print."""
    files = list(symbol_files)

    def factory(session: Session) -> MonitorFn:
        symbols = SymbolTable()
        for path in files:
            # The server runs the image whatever happens; symbols are a convenience.
            with contextlib.suppress(XendbgError):
                symbols.load(path)
        buf = io.StringIO()
        console = Console(
            file=buf,
            highlight=False,
            color_system=None,
            force_terminal=False,
            no_color=True,
            width=100,
        )
        dbg = Debugger(console, session=session, symbols=symbols, context_after_stop=False)

        def monitor(line: str) -> str:
            buf.seek(0)
            buf.truncate()
            try:
                execute(dbg, line, monitor=True)
            except XendbgError as e:
                console.print(f"error: {e}", highlight=False, markup=False)
            return buf.getvalue()

        return monitor

    return factory
