"""The REPL's command registry, help generation, option parsing and tab completion."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from xendbg.frontend.repl.app import history_path, use_color
from xendbg.frontend.repl.commands import REGISTRY, parse_options, split_trailing_count
from xendbg.frontend.repl.completion import StaticNames, complete
from xendbg.frontend.repl.registry import CommandError, Registry

NAMES = StaticNames(
    symbols=["main_loop", "counter", "compute", "tick"],
    registers=["rax", "rip", "eax", "rsp"],
    variables=["foo"],
)


@pytest.mark.parametrize(
    ("line", "command", "args"),
    [
        ("breakpoint create main_loop", "breakpoint create", "main_loop"),
        ("b main_loop + 4", "breakpoint create", "main_loop + 4"),
        ("brea tick", "breakpoint create", "tick"),  # GDB: a prefix of `break`
        ("c", "continue", ""),
        ("cont -t 1", "continue", "-t 1"),
        ("si", "step", ""),
        ("st", "step", ""),  # `step` is a prefix of `stepi`: it wins, as in GDB
        ("s 3", "step", "3"),
        ("x/4gx $rsp", "examine", "/4gx $rsp"),
        ("p/x 17", "print", "/x 17"),
        ("p $rax", "print", "$rax"),
        ("info r rip", "info registers", "rip"),
        ("i r", "info registers", ""),
        ("info reg", "info registers", ""),
        ("disas $rip 3", "disassemble", "$rip 3"),
        ("guest list", "guest list", ""),
        ("  watchpoint   create counter 8 w ", "watchpoint create", "counter 8 w"),
        ("sym lo /tmp/a.elf", "symbol load", "/tmp/a.elf"),
        ("q", "quit", ""),
    ],
)
def test_resolve(line: str, command: str, args: str) -> None:
    cmd, rest = REGISTRY.resolve(line)
    assert cmd.name == command
    assert rest == args


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("frobnicate", "unknown command 'frobnicate'"),
        ("guest", "guest needs a sub-command: attach, detach, list, pause, unpause"),
        ("guest fly", "unknown guest sub-command 'fly'"),
        ("e 1", "ambiguous command 'e': examine, exit"),
        ("breakpoint/x 1", "'breakpoint' takes no /FORMAT"),
    ],
)
def test_resolve_errors(line: str, message: str) -> None:
    with pytest.raises(CommandError) as info:
        REGISTRY.resolve(line)
    assert str(info.value).startswith(message)


def test_every_command_has_usage_and_help() -> None:
    overview = REGISTRY.help()
    for cmd in REGISTRY.commands:
        assert cmd.usage.split()[0] == cmd.path[0]
        assert cmd.usage in overview
        text = REGISTRY.help(cmd.name)
        assert text.startswith(f"usage: {cmd.usage}")
        for alias in cmd.alias_names():
            assert REGISTRY.help(alias) == text


def test_group_help_lists_its_subcommands() -> None:
    text = REGISTRY.help("watchpoint")
    assert text.splitlines()[0] == "watchpoint: data watchpoints"
    assert [line.split()[1] for line in text.splitlines()[1:]] == ["create", "delete", "list"]
    with pytest.raises(CommandError):
        REGISTRY.help("nosuch")


def test_duplicate_registration_is_refused() -> None:
    reg = Registry()
    reg.command("a b", usage="a b", summary="x")(lambda d, a: None)
    with pytest.raises(ValueError, match="registered twice"):
        reg.command("z", usage="z", summary="y", aliases=("a b",))(lambda d, a: None)


def test_parse_options() -> None:
    spec = {"-f": ("x", "d"), "-n": (), "-h": None}
    assert parse_options("-f d -n 4 $rax", spec) == ({"-f": "d", "-n": "4"}, "$rax")
    assert parse_options("-fx -h main", spec) == ({"-f": "x", "-h": ""}, "main")
    assert parse_options("-1 + 2", spec) == ({}, "-1 + 2")  # an expression, not an option
    assert parse_options("-- -f", spec) == ({}, "-f")
    with pytest.raises(CommandError, match="not one of x, d"):
        parse_options("-f q 1", spec)
    with pytest.raises(CommandError, match="unknown option -z"):
        parse_options("-z 1", spec)
    with pytest.raises(CommandError, match="needs a value"):
        parse_options("-n", spec)


def test_split_trailing_count() -> None:
    assert split_trailing_count("$rip 5") == ("$rip", "5")
    assert split_trailing_count("$rip + 5") == ("$rip + 5", None)
    assert split_trailing_count("main_loop") == ("main_loop", None)


@pytest.mark.parametrize(
    ("line", "start", "words"),
    [
        ("gu", 0, ["guest"]),
        ("guest ", 6, ["attach", "detach", "list", "pause", "unpause"]),
        ("guest a", 6, ["attach"]),
        ("brea", 0, ["break", "breakpoint"]),
        ("breakpoint c", 11, ["create"]),
        ("breakpoint create ma", 18, ["main_loop"]),
        ("b &co", 3, ["compute", "counter"]),
        ("b co", 2, ["compute", "counter"]),
        ("p $r", 2, ["$rax", "$rip", "$rsp"]),
        ("p 1+$f", 4, ["$foo"]),
        ("p (tick+$ri", 8, ["$rip"]),
        ("p -f ", 5, ["b", "c", "d", "o", "t", "u", "x"]),
        ("p -", 2, ["-f"]),
        ("x/4gx $rs", 6, ["$rsp"]),
        ("examine -w ", 11, ["b", "g", "h", "w"]),
        ("info r", 5, ["r", "registers"]),
        ("info r ri", 7, ["rip"]),
        ("info r $ri", 8, ["rip"]),
        ("watchpoint create counter 8 ", 28, ["a", "r", "w"]),
        ("watchpoint create coun", 18, ["counter"]),
        ("set $", 4, ["$eax", "$foo", "$rax", "$rip", "$rsp"]),
        ("set $x = ti", 9, ["tick"]),
        ("unset $f", 6, ["$foo"]),
        ("breakpoint delete ", 18, ["all"]),
        ("help gu", 5, []),  # help takes free words
        ("p 12", 2, []),
        ("nosuch a", 7, []),
        ("continue ", 9, []),
    ],
)
def test_completion(line: str, start: int, words: list[str]) -> None:
    assert complete(REGISTRY, line, NAMES) == (start, words)


def test_top_level_completion_hides_one_letter_aliases_until_typed() -> None:
    _, words = complete(REGISTRY, "", NAMES)
    assert "breakpoint" in words and "print" in words
    assert "b" not in words and "p" not in words
    assert complete(REGISTRY, "p", NAMES)[1] == ["p", "print"]


def test_completion_of_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "guest.elf").write_bytes(b"")
    (tmp_path / "guests").mkdir()
    (tmp_path / "other").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert complete(REGISTRY, "symbol load gu", NAMES) == (12, ["guest.elf", "guests/"])
    line = f"symbol load {tmp_path}/o"
    assert complete(REGISTRY, line, NAMES) == (12, [f"{tmp_path}/other"])


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_terminals_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(False, True, _Tty())
    assert not use_color(True, True, _Tty())  # --no-color
    assert not use_color(False, False, _Tty())  # script mode
    assert not use_color(False, True, io.StringIO())  # output is not a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(False, True, _Tty())


def test_history_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert history_path() == tmp_path / "state" / "xendbg" / "history"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_path() == tmp_path / ".xendbg_history"
