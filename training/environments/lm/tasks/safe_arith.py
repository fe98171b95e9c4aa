"""A safe arithmetic evaluator for model-written expressions (never `eval`).

Grammar (recursive descent, exact `Fraction` arithmetic):

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := "-" unary | primary
    primary := INTEGER | "(" expr ")"

INTEGER is ASCII decimal digits without leading zeros ("0" itself is fine). Anything else is
rejected: exponents (`^`, `**`), unary plus, decimals, names, non-ASCII digits such as "٣",
unbalanced parentheses. Cost is bounded by the length limit and the nesting limit, so no
input can make evaluation slow: with only + - * / the value of an n-character expression has
O(n) digits.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32

_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))", re.ASCII)


class ExpressionError(ValueError):
    """The text is not a valid expression (or divides by zero)."""


def evaluate(text: str, max_chars: int = MAX_CHARS, max_depth: int = MAX_DEPTH) -> tuple[Fraction, list[int]]:
    """The exact value of `text` and the integers it uses, in order of appearance."""
    text = text.strip()
    if len(text) > max_chars:
        raise ExpressionError(f"expression longer than {max_chars} characters")
    parser = _Parser(_tokenize(text), max_depth)
    value = parser.expr(0)
    if parser.pos != len(parser.tokens):
        raise ExpressionError(f"unexpected {parser.tokens[parser.pos]!r}")
    return value, parser.numbers


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExpressionError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        token = match.group(1) or match.group(2)
        if match.group(1) and len(token) > 1 and token[0] == "0":
            raise ExpressionError(f"number with a leading zero: {token!r}")
        tokens.append(token)
        pos = match.end()
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str], max_depth: int):
        self.tokens = tokens
        self.pos = 0
        self.max_depth = max_depth
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.unary(depth)
            if op == "*":
                value = value * right
            elif right == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / right
        return value

    def unary(self, depth: int) -> Fraction:
        if depth > self.max_depth:
            raise ExpressionError(f"nesting deeper than {self.max_depth}")
        if self.peek() == "-":
            self.take()
            return -self.unary(depth + 1)
        return self.primary(depth)

    def primary(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("unbalanced parentheses")
            return value
        if token.isdigit():  # the tokenizer only lets ASCII digits through
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"unexpected {token!r}")
