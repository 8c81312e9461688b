"""Debugger expressions: a lexer, a precedence-climbing parser and an evaluator.

Grammar (C precedence, all values unbounded integers until displayed)::

    expr    := binary
    binary  := unary (OP unary)*        OP: * / %  >  + -  >  << >>  >  &  >  ^  >  |
    unary   := ('-' | '+' | '~' | '*' | '&') unary | primary
    primary := NUMBER | SYMBOL | '$' NAME | '(' expr ')'

``*EXPR`` reads one guest word (the guest's width) at EXPR; ``&sym`` and a bare
``sym`` both give a symbol's address (there are no types, as in the original
xendbg); ``$name`` is a register if the guest has one by that name, else a user
variable.  Every error carries the span of the offending token so the REPL can
print the expression with a caret under it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from xendbg.errors import GuestMemoryFault, XendbgError

MASK64 = (1 << 64) - 1


class ExprError(XendbgError):
    """A bad expression; ``start``/``end`` delimit the offending text in ``text``."""

    def __init__(self, message: str, text: str, start: int, end: int) -> None:
        self.message = message
        self.text = text
        self.start = start
        self.end = max(end, start + 1)
        super().__init__(self.render())

    def render(self) -> str:
        caret = " " * self.start + "^" * (self.end - self.start)
        return f"{self.message}\n  {self.text}\n  {caret}"


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # "num", "sym", "reg", "op", "end"
    text: str
    start: int
    value: int = 0

    @property
    def end(self) -> int:
        return self.start + max(len(self.text), 1)


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|[0-9]+)(?P<numtail>[A-Za-z0-9_]*)
  | (?P<reg>\$[A-Za-z_0-9]*)
  | (?P<sym>[A-Za-z_.][A-Za-z0-9_.@]*)
  | (?P<op><<|>>|[-+*/%&|^~()])
    """,
    re.VERBOSE,
)


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExprError(f"unexpected character {text[pos]!r}", text, pos, pos + 1)
        word = m.group(0)
        if m.group("num") is not None:
            if m.group("numtail"):
                raise ExprError(f"bad number {word!r}", text, pos, m.end())
            base = 0 if word[:2].lower() in ("0x", "0b", "0o") else 10
            tokens.append(Token("num", word, pos, int(word, base)))
        elif m.group("reg") is not None:
            if len(word) == 1:
                raise ExprError("'$' needs a register or variable name", text, pos, pos + 1)
            tokens.append(Token("reg", word, pos))
        elif m.group("sym") is not None:
            tokens.append(Token("sym", word, pos))
        elif m.group("op") is not None:
            tokens.append(Token("op", word, pos))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


# -- syntax tree ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Num:
    value: int
    tok: Token


@dataclass(frozen=True, slots=True)
class Sym:
    name: str
    tok: Token


@dataclass(frozen=True, slots=True)
class Reg:
    name: str  # without the '$'
    tok: Token


@dataclass(frozen=True, slots=True)
class Unary:
    op: str
    operand: Node
    tok: Token
    end: int  # end of the operand's text, closing parentheses included


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    left: Node
    right: Node
    tok: Token


Node = Num | Sym | Reg | Unary | Binary

_BINARY_PRECEDENCE = {
    "|": 1,
    "^": 2,
    "&": 3,
    "<<": 4,
    ">>": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
    "%": 6,
}
_UNARY = ("-", "+", "~", "*", "&")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, message: str, tok: Token) -> ExprError:
        return ExprError(message, self.text, tok.start, tok.end)

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.error("expression expected", self.peek())
        node = self.binary(1)
        tok = self.peek()
        if tok.kind != "end":
            raise self.error(f"unexpected {tok.text!r}", tok)
        return node

    def binary(self, min_prec: int) -> Node:
        left = self.unary()
        while True:
            tok = self.peek()
            prec = _BINARY_PRECEDENCE.get(tok.text) if tok.kind == "op" else None
            if prec is None or prec < min_prec:
                return left
            self.take()
            right = self.binary(prec + 1)
            left = Binary(tok.text, left, right, tok)

    def unary(self) -> Node:
        tok = self.peek()
        if tok.kind == "op" and tok.text in _UNARY:
            self.take()
            operand = self.unary()
            end = self.tokens[self.i - 1].end
            if tok.text == "&" and not isinstance(operand, Sym):
                raise ExprError("'&' needs a symbol name", self.text, tok.start, end)
            return Unary(tok.text, operand, tok, end)
        return self.primary()

    def primary(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            return Num(tok.value, tok)
        if tok.kind == "sym":
            return Sym(tok.text, tok)
        if tok.kind == "reg":
            return Reg(tok.text[1:], tok)
        if tok.text == "(":
            node = self.binary(1)
            close = self.peek()
            if close.text != ")":
                raise self.error("')' expected", close)
            self.take()
            return node
        if tok.kind == "end":
            raise self.error("operand expected", tok)
        raise self.error(f"unexpected {tok.text!r}", tok)


def parse(text: str) -> Node:
    """Parse ``text``; ExprError with the offending token's span if it is malformed."""
    return _Parser(text).parse()


# -- evaluation ---------------------------------------------------------------------


class Env(Protocol):
    """What an expression can refer to."""

    def register(self, name: str) -> int | None:
        """Value of register ``name`` (without '$'), None if there is no such register."""

    def variable(self, name: str) -> int | None:
        """Value of user variable ``name``, None if unset."""

    def symbol(self, name: str) -> int | None:
        """Address of symbol ``name``, None if unknown."""

    def read_word(self, addr: int) -> int:
        """One guest word at virtual ``addr``; GuestMemoryFault if unreadable."""


def _shift(a: int, b: int, left: bool) -> int:
    return a << b if left else a >> b


_BINOPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "&": lambda a, b: a & b,
    "|": lambda a, b: a | b,
    "^": lambda a, b: a ^ b,
}


class Evaluator:
    def __init__(self, text: str, env: Env) -> None:
        self.text = text
        self.env = env

    def error(self, message: str, tok: Token, end: int | None = None) -> ExprError:
        return ExprError(message, self.text, tok.start, tok.end if end is None else end)

    def eval(self, node: Node) -> int:
        if isinstance(node, Num):
            return node.value
        if isinstance(node, Sym):
            return self._symbol(node)
        if isinstance(node, Reg):
            value = self.env.register(node.name)
            if value is None:
                value = self.env.variable(node.name)
            if value is None:
                raise self.error(f"no register or variable ${node.name}", node.tok)
            return value
        if isinstance(node, Unary):
            if node.op == "&":
                assert isinstance(node.operand, Sym)
                return self._symbol(node.operand)
            value = self.eval(node.operand)
            if node.op == "-":
                return -value
            if node.op == "~":
                return ~value
            if node.op == "*":
                addr = value & MASK64
                try:
                    return self.env.read_word(addr)
                except GuestMemoryFault as e:
                    raise self.error(
                        f"cannot read guest memory at {e.addr:#x} ({e.reason})", node.tok, node.end
                    ) from e
            return value
        left = self.eval(node.left)
        right = self.eval(node.right)
        if node.op in ("/", "%"):
            if right == 0:
                raise self.error("division by zero", node.tok)
            # C semantics: truncate toward zero.
            q = abs(left) // abs(right) * (1 if (left < 0) == (right < 0) else -1)
            return q if node.op == "/" else left - q * right
        if node.op in ("<<", ">>"):
            if right < 0 or right > 4096:
                raise self.error(f"bad shift count {right}", node.tok)
            return _shift(left, right, node.op == "<<")
        return _BINOPS[node.op](left, right)

    def _symbol(self, node: Sym) -> int:
        addr = self.env.symbol(node.name)
        if addr is None:
            raise self.error(f"no symbol {node.name!r} (load one with `symbol load`)", node.tok)
        return addr


def evaluate(text: str, env: Env) -> int:
    """Parse and evaluate ``text`` against ``env``."""
    return Evaluator(text, env).eval(parse(text))


def parses(text: str) -> bool:
    """True if ``text`` is a syntactically valid expression."""
    try:
        parse(text)
    except ExprError:
        return False
    return True
