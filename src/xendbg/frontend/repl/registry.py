"""The command registry: commands register with a decorator; help, completion and
gdb's ``monitor`` are all generated from it.

A command has a path of words (``("breakpoint", "create")``) and alias paths
(``("b",)``, ``("info", "r")``).  The words form a trie; a line resolves by
walking it with exact words first, then unique prefixes (``disas``, ``brea``), as
GDB does.  A first word may carry a ``/FMT`` suffix (``x/4gx``, ``p/x``): the
suffix is handed to the command as the start of its arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xendbg.errors import XendbgError

# Kinds of positional argument, for completion.
EXPR = "expr"  # an expression: symbols, $registers, $variables
VAR = "var"  # a $variable or $register name
REG = "reg"  # a register name, '$' optional
FILE = "file"
WORD = "word"  # free text, nothing to complete

Handler = Callable[[Any, str], None]


class CommandError(XendbgError):
    """A command was misused (bad arguments, unknown command)."""


@dataclass(frozen=True, slots=True)
class Command:
    path: tuple[str, ...]
    handler: Handler
    usage: str
    summary: str
    details: str = ""
    aliases: tuple[tuple[str, ...], ...] = ()
    # "-f" → the values it takes (completion); (): any value; None: a flag.
    options: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)
    # Kinds of the positional arguments; the last one repeats.  Choice lists
    # are given as tuples of words.
    args: tuple[str | tuple[str, ...], ...] = ()
    monitor: bool = True  # also offered through gdb's `monitor`
    runs_guest: bool = False  # lets the guest run: Ctrl-C interrupts it

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def alias_names(self) -> list[str]:
        return [" ".join(a) for a in self.aliases]


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    command: Command | None = None
    summary: str = ""  # for groups (words that only lead to sub-commands)
    hidden: set[str] = field(default_factory=set)  # alias words: not listed in help


class Registry:
    def __init__(self) -> None:
        self.root = _Node()
        self.commands: list[Command] = []

    # -- registration -------------------------------------------------------------
    def group(self, word: str, summary: str) -> None:
        self.root.children.setdefault(word, _Node()).summary = summary

    def command(
        self,
        name: str,
        *,
        usage: str,
        summary: str,
        details: str = "",
        aliases: tuple[str, ...] = (),
        options: Mapping[str, tuple[str, ...] | None] | None = None,
        args: tuple[str | tuple[str, ...], ...] = (),
        monitor: bool = True,
        runs_guest: bool = False,
    ) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            cmd = Command(
                tuple(name.split()),
                fn,
                usage,
                summary,
                details,
                tuple(tuple(a.split()) for a in aliases),
                dict(options or {}),
                args,
                monitor,
                runs_guest,
            )
            self.add(cmd)
            return fn

        return register

    def add(self, cmd: Command) -> None:
        self._insert(cmd.path, cmd, alias=False)
        for a in cmd.aliases:
            self._insert(a, cmd, alias=True)
        self.commands.append(cmd)

    def _insert(self, path: tuple[str, ...], cmd: Command, *, alias: bool) -> None:
        node = self.root
        for word in path:
            if alias and word not in node.children:
                node.hidden.add(word)
            node = node.children.setdefault(word, _Node())
        if node.command is not None and node.command is not cmd:
            raise ValueError(f"{' '.join(path)!r} registered twice")
        node.command = cmd

    # -- lookup ---------------------------------------------------------------------
    def _child(self, node: _Node, word: str, path: list[str]) -> tuple[str, _Node] | None:
        if word in node.children:
            return word, node.children[word]
        matches = sorted(w for w in node.children if w.startswith(word))
        if not matches:
            return None
        # A unique prefix; or, like GDB's `brea` → `break`, the match that
        # all the others extend.
        if all(m.startswith(matches[0]) for m in matches):
            return matches[0], node.children[matches[0]]
        where = " ".join(path) or "command"
        raise CommandError(f"ambiguous {where} {word!r}: " + ", ".join(matches))

    def resolve(self, line: str) -> tuple[Command, str]:
        """The command a line names and the rest of the line (its arguments)."""
        text = line.strip()
        node = self.root
        path: list[str] = []
        pos = 0
        while True:
            rest = text[pos:].lstrip()
            if not rest:
                break
            start = len(text) - len(rest)
            word = rest.split(None, 1)[0]
            suffix = ""
            if not path and "/" in word[1:]:
                word, suffix = word.split("/", 1)
                suffix = "/" + suffix
            child = self._child(node, word, path)
            if child is None:
                break
            key, node = child
            path.append(key)
            pos = start + len(word)
            if suffix:
                if node.command is None:
                    raise CommandError(f"{word!r} takes no /FORMAT")
                return node.command, (suffix + text[pos + len(suffix) :]).strip()
            if not node.children:
                break
        if node.command is not None:
            return node.command, text[pos:].strip()
        if not path:
            word = text.split(None, 1)[0] if text else ""
            raise CommandError(f"unknown command {word!r} (try `help`)")
        subs = ", ".join(self.subcommands(tuple(path)))
        extra = text[pos:].split(None, 1)
        if extra:
            raise CommandError(f"unknown {' '.join(path)} sub-command {extra[0]!r}: try {subs}")
        raise CommandError(f"{' '.join(path)} needs a sub-command: {subs}")

    def node(self, path: tuple[str, ...]) -> _Node | None:
        node = self.root
        for word in path:
            nxt = node.children.get(word)
            if nxt is None:
                return None
            node = nxt
        return node

    def subcommands(self, path: tuple[str, ...], *, with_aliases: bool = False) -> list[str]:
        node = self.node(path)
        if node is None:
            return []
        words = [w for w in node.children if with_aliases or w not in node.hidden]
        return sorted(words)

    def find(self, topic: str) -> Command | None:
        try:
            cmd, rest = self.resolve(topic)
        except CommandError:
            return None
        return cmd if not rest else None

    # -- help -------------------------------------------------------------------------
    def help(self, topic: str = "") -> str:
        topic = topic.strip()
        if not topic:
            return self._overview()
        cmd = None
        try:
            cmd, rest = self.resolve(topic)
            if rest:
                cmd = None
        except CommandError:
            pass
        if cmd is not None:
            lines = [f"usage: {cmd.usage}", "", cmd.summary]
            if cmd.details:
                lines += ["", cmd.details]
            if cmd.aliases:
                lines += ["", "aliases: " + ", ".join(cmd.alias_names())]
            if not cmd.monitor:
                lines += ["", "(not available through gdb's `monitor`)"]
            return "\n".join(lines)
        words = tuple(topic.split())
        node = self.node(words)
        if node is not None and node.children:
            subs = [c for c in self.commands if c.path[: len(words)] == words]
            head = [f"{topic}: {node.summary}"] if node.summary else []
            return "\n".join(head + [f"  {c.usage:<44} {c.summary}" for c in subs])
        raise CommandError(f"no help for {topic!r}: no such command")

    def _overview(self) -> str:
        lines = ["Commands (`help COMMAND` for details):"]
        for cmd in self.commands:
            alias = f"  [{', '.join(cmd.alias_names())}]" if cmd.aliases else ""
            lines.append(f"  {cmd.usage:<44} {cmd.summary}{alias}")
        return "\n".join(lines)
