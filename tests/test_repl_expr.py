"""REPL expressions: lexer, parser, evaluator, caret error reports; value formats."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xendbg.errors import GuestMemoryFault
from xendbg.frontend.repl.expr import ExprError, evaluate, parse, tokenize
from xendbg.frontend.repl.fmt import examine_rows, format_value, parse_slash_format


@dataclass
class DictEnv:
    regs: dict[str, int] = field(default_factory=dict)
    variables: dict[str, int] = field(default_factory=dict)
    symbols: dict[str, int] = field(default_factory=dict)
    memory: dict[int, int] = field(default_factory=dict)  # word address -> word
    reads: list[int] = field(default_factory=list)

    def register(self, name: str) -> int | None:
        return self.regs.get(name)

    def variable(self, name: str) -> int | None:
        return self.variables.get(name)

    def symbol(self, name: str) -> int | None:
        return self.symbols.get(name)

    def read_word(self, addr: int) -> int:
        self.reads.append(addr)
        if addr not in self.memory:
            raise GuestMemoryFault(addr)
        return self.memory[addr]


ENV = DictEnv(
    regs={"rip": 0xFFFFFFFF8010D014, "rsp": 0x1000, "rax": 7},
    variables={"n": 3, "rax_copy": 9},
    symbols={"main_loop": 0xFFFFFFFF8010D014, "counter": 0xFFFFFFFF8010E000},
    memory={0x1000: 0x42, 0xFFFFFFFF8010E000: 0x1234},
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0x11", 0x11),
        ("17", 17),
        ("0b101 + 0o17", 5 + 15),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),  # left associative
        ("100 / 7", 14),
        ("-7 / 2", -3),  # C: truncation toward zero
        ("-7 % 2", -1),
        ("1 << 4 | 1", 17),
        ("0xff & ~0xf ^ 1", 0xF1),
        ("-$rax", -7),
        ("$rip + 4", 0xFFFFFFFF8010D018),
        ("$n * 2", 6),
        ("&main_loop", 0xFFFFFFFF8010D014),
        ("main_loop + 0x10", 0xFFFFFFFF8010D024),
        ("*$rsp", 0x42),
        ("*counter + 1", 0x1235),
        ("*(&counter)", 0x1234),
        ("  ( ( 2 ) )  ", 2),
    ],
)
def test_evaluates(text: str, value: int) -> None:
    assert evaluate(text, ENV) == value


def test_register_shadows_variable_of_same_name() -> None:
    env = DictEnv(regs={"rax": 1}, variables={"rax": 2, "x": 5})
    assert evaluate("$rax", env) == 1
    assert evaluate("$x", env) == 5


@pytest.mark.parametrize(
    ("text", "message", "caret_at", "caret_len"),
    [
        ("1 + nosuch", "no symbol 'nosuch'", 4, 6),
        ("$nosuch + 1", "no register or variable $nosuch", 0, 7),
        ("1 / (2 - 2)", "division by zero", 2, 1),
        ("1 +", "operand expected", 3, 1),
        ("(1 + 2", "')' expected", 6, 1),
        ("1 2", "unexpected '2'", 2, 1),
        ("2 # 3", "unexpected character '#'", 2, 1),
        ("0x1g", "bad number '0x1g'", 0, 4),
        ("&(1+2)", "'&' needs a symbol name", 0, 6),
        ("*0x2000 + 1", "cannot read guest memory at 0x2000", 0, 7),
        ("", "expression expected", 0, 1),
        ("$", "'$' needs a register or variable name", 0, 1),
    ],
)
def test_errors_point_at_the_offending_token(
    text: str, message: str, caret_at: int, caret_len: int
) -> None:
    with pytest.raises(ExprError) as info:
        evaluate(text, ENV)
    err = info.value
    assert err.message.startswith(message)
    assert (err.start, err.end - err.start) == (caret_at, caret_len)
    lines = str(err).splitlines()
    assert lines[1] == "  " + text
    assert lines[2] == "  " + " " * caret_at + "^" * caret_len


def test_tokens_keep_their_positions() -> None:
    toks = tokenize("$rip+ &sym")
    assert [(t.kind, t.text, t.start) for t in toks] == [
        ("reg", "$rip", 0), ("op", "+", 4), ("op", "&", 6), ("sym", "sym", 7), ("end", "", 10),
    ]  # fmt: skip


_atoms = st.integers(min_value=0, max_value=1 << 70)


@st.composite
def _exprs(draw: st.DrawFn, depth: int = 0) -> tuple[str, int]:
    if depth > 3 or draw(st.booleans()):
        v = draw(_atoms)
        return (hex(v) if draw(st.booleans()) else str(v)), v
    op = draw(st.sampled_from(["+", "-", "*", "&", "|", "^"]))
    lt, lv = draw(_exprs(depth + 1))
    rt, rv = draw(_exprs(depth + 1))
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "&": lv & rv, "|": lv | rv,
             "^": lv ^ rv}[op]  # fmt: skip
    return f"({lt} {op} {rt})", value


@given(_exprs())
def test_fully_parenthesised_expressions_match_python(case: tuple[str, int]) -> None:
    text, value = case
    assert evaluate(text, ENV) == value


@given(st.text(alphabet="0123456789xabc$+-*/()&~ ", max_size=20))
def test_any_input_parses_or_raises_a_located_error(text: str) -> None:
    try:
        parse(text)
    except ExprError as e:
        assert 0 <= e.start <= len(text)
        assert e.end > e.start


@pytest.mark.parametrize(
    ("value", "fmt", "bits", "text"),
    [
        (0x11, "x", 64, "0x11"),
        (-1, "x", 64, "0xffffffffffffffff"),
        (-1, "x", 32, "0xffffffff"),
        (-1, "d", 64, "-1"),
        (0xFFFFFFFF, "d", 32, "-1"),
        (0xFFFFFFFF, "u", 32, "4294967295"),
        (5, "b", 64, "0b101"),
        (8, "o", 64, "010"),
        (0x41, "c", 64, "65 'A'"),
        (0x11, "x", 16, "0x11"),
    ],
)
def test_format_value(value: int, fmt: str, bits: int, text: str) -> None:
    assert format_value(value, fmt, bits) == text


def test_slash_formats_follow_gdb() -> None:
    assert parse_slash_format("4gx") == (4, "x", 8)
    assert parse_slash_format("8xb") == (8, "x", 1)
    assert parse_slash_format("2dw") == (2, "d", 4)
    assert parse_slash_format("bw") == (None, "b", 4)  # binary words
    assert parse_slash_format("h") == (None, None, 2)


def test_examine_rows_are_address_prefixed() -> None:
    data = bytes(range(16))
    rows = examine_rows(data, 0x1000, 4, "x", lambda a: "buf" if a == 0x1000 else None)
    assert rows == [
        "0x1000 <buf>:  0x03020100  0x07060504  0x0b0a0908  0x0f0e0d0c",
    ]
    rows = examine_rows(data, 0x2000, 8, "x", lambda a: None)
    assert rows == ["0x2000:  0x0706050403020100  0x0f0e0d0c0b0a0908"]
