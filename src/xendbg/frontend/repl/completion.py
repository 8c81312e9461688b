"""Tab completion as a pure function of the registry, the line and the known names.

``complete(registry, line, names)`` returns where the replaced text starts in the
line and the sorted candidates: command and sub-command words, option names and
their values, then per argument kind: ``$registers``/``$variables`` after ``$``,
symbols after ``&`` or as bare words in expressions, file names, fixed choices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from xendbg.frontend.repl.registry import EXPR, FILE, REG, VAR, Command, CommandError, Registry

_FRAGMENT = re.compile(r"[$&]?[A-Za-z0-9_.@]*$")


class Names(Protocol):
    def symbol_names(self) -> Iterable[str]: ...

    def register_names(self) -> Iterable[str]: ...

    def variable_names(self) -> Iterable[str]: ...


@dataclass(slots=True)
class StaticNames:
    """A fixed set of names (tests, or a REPL that is not attached)."""

    symbols: list[str] = field(default_factory=list)
    registers: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)

    def symbol_names(self) -> Iterable[str]:
        return self.symbols

    def register_names(self) -> Iterable[str]:
        return self.registers

    def variable_names(self) -> Iterable[str]:
        return self.variables


def _words(line: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group()) for m in re.finditer(r"\S+", line)]


def _filter(prefix: str, options: Iterable[str]) -> list[str]:
    return sorted({o for o in options if o.startswith(prefix)})


def complete(registry: Registry, line: str, names: Names) -> tuple[int, list[str]]:
    """Completions of the text before the cursor (``line``): (start, candidates)."""
    words = _words(line)
    if line and not line[-1].isspace() and words:
        cur_start, current = words[-1]
        done = words[:-1]
    else:
        cur_start, current = len(line), ""
        done = words
    # Walk the command words that are already complete.
    path: list[str] = []
    node = registry.root
    used = 0
    for k, (_, word) in enumerate(done):
        slash = k == 0 and "/" in word[1:]
        if not node.children:
            break
        try:
            child = registry._child(node, word.split("/", 1)[0] if slash else word, path)
        except CommandError:
            return cur_start, []
        if child is None:
            break
        path.append(child[0])
        node = child[1]
        used += 1
        if slash:
            break
    if used == len(done) and node.children:
        # Still choosing a command word at this level; the short aliases (b, c,
        # info r …) are offered only once something is typed.
        pool = registry.subcommands(tuple(path), with_aliases=bool(current))
        return cur_start, _filter(current, pool)
    if node.command is None:
        return cur_start, []
    return _complete_args(node.command, [w for _, w in done[used:]], cur_start, current, names)


def _complete_args(
    cmd: Command, done: list[str], cur_start: int, current: str, names: Names
) -> tuple[int, list[str]]:
    # Options come first; skip them (and their values) to count positionals.
    positional: list[str] = []
    expecting_value: str | None = None
    options_over = False
    for w in done:
        if expecting_value is not None:
            expecting_value = None
            continue
        if not options_over and not positional and w[:2] in cmd.options and w.startswith("-"):
            if cmd.options[w[:2]] is not None and len(w) == 2:
                expecting_value = w[:2]
            continue
        options_over = True
        positional.append(w)
    if expecting_value is not None:
        choices = cmd.options[expecting_value] or ()
        return cur_start, _filter(current, choices)
    if current.startswith("-") and not positional and cmd.options:
        return cur_start, _filter(current, cmd.options)
    if not cmd.args:
        return cur_start, []
    kind = cmd.args[min(len(positional), len(cmd.args) - 1)]
    if isinstance(kind, tuple):
        return cur_start, _filter(current, kind)
    if kind == FILE:
        return cur_start, _complete_path(current)
    if kind == REG:
        frag = current.removeprefix("$")
        return cur_start + len(current) - len(frag), _filter(frag, names.register_names())
    if kind not in (EXPR, VAR):
        return cur_start, []
    m = _FRAGMENT.search(current)
    frag = m.group() if m else ""
    start = cur_start + len(current) - len(frag)
    if frag.startswith("$"):
        pool = [f"${n}" for n in (*names.register_names(), *names.variable_names())]
        return start, _filter(frag, pool)
    if kind == VAR:
        # A variable name must start with '$': offer every one on an empty word.
        pool = [f"${n}" for n in (*names.register_names(), *names.variable_names())]
        return (start, sorted(set(pool))) if not frag else (start, [])
    if frag.startswith("&"):
        frag = frag[1:]
        start += 1
    if frag[:1].isdigit():
        return start, []
    return start, _filter(frag, names.symbol_names())


def _complete_path(current: str) -> list[str]:
    directory, _, base = current.rpartition("/")
    where = os.path.expanduser(directory) if directory else "."
    if current.startswith("/") and not directory:
        where = "/"
    try:
        entries = os.listdir(where or "/")
    except OSError:
        return []
    prefix = (directory + "/") if directory or current.startswith("/") else ""
    out = []
    for e in entries:
        if e.startswith(base) and (base.startswith(".") or not e.startswith(".")):
            full = os.path.join(where or "/", e)
            out.append(prefix + e + ("/" if os.path.isdir(full) else ""))
    return sorted(out)
