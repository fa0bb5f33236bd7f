"""Metadata filter strings: a small grammar parsed by hand and evaluated column-wise, never by `eval`.

    filter  := or ;  or := and ("or" and)* ;  and := not ("and" not)* ;  not := "not" not | atom
    atom    := "(" filter ")" | column OP literal | column ["not"] "in" "[" literal ("," literal)* "]"
    OP      := == != < <= > >=        literal := "string" | 'string' | number | true | false
    column  := name ([A-Za-z_][A-Za-z0-9_]*) | `any name in backquotes`

One grammar for `SearchIndex.search(filter="...")`, `clipkit search --filter` and the service's `filter=`.
A comparison is elementwise as in pandas: a missing value matches no comparison except `!=`. A literal
must have the column's kind (string, number, boolean); a mismatch is an error, not an empty result.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Union

import numpy as np
import pandas as pd

OPS = ("==", "!=", "<=", ">=", "<", ">")
KEYWORDS = ("and", "or", "not", "in", "true", "false")
MAX_FILTER_CHARS, MAX_TERMS, MAX_DEPTH, MAX_IN_VALUES = 10_000, 256, 32, 1000
_TOKEN = re.compile(r"""\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_]))
                    |(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<name>[A-Za-z_][A-Za-z0-9_]*)
                    |(?P<quoted>`[^`]+`)|(?P<op>==|!=|<=|>=|<|>)|(?P<punct>[()\[\],]))""", re.VERBOSE)
Literal = Union[str, int, float, bool]


class FilterError(ValueError):
    """A filter string that does not parse or does not fit the metadata; `position` is a 0-based offset."""

    def __init__(self, text: str, position: int, message: str) -> None:
        super().__init__(f"invalid filter at position {position}: {message} (in {text[:200]!r})")
        self.position, self.reason = position, message


@dataclass(frozen=True)
class Compare:
    column: str
    op: str
    value: Literal
    pos: int


@dataclass(frozen=True)
class Member:
    column: str
    values: tuple[Literal, ...]
    negate: bool
    pos: int


@dataclass(frozen=True)
class Logic:
    op: str  # "and" | "or" | "not"
    parts: tuple["Node", ...]


Node = Union[Compare, Member, Logic]


@dataclass(frozen=True)
class Token:
    kind: str  # num, str, name, quoted, op, punct, end
    text: str
    pos: int


def _tokens(text: str) -> list[Token]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if not text[pos:].strip():
                break
            bad = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise FilterError(text, bad, f"unexpected character {text[bad]!r}")
        kind = m.lastgroup
        out.append(Token(kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(Token("end", "", len(text)))
    return out


class _Parser:
    """Recursive descent over the token list; every error names the offending token's offset."""

    def __init__(self, text: str) -> None:
        self.text, self.toks, self.i, self.terms = text, _tokens(text), 0, 0

    def fail(self, tok: Token, message: str) -> FilterError:
        return FilterError(self.text, tok.pos, message)

    def peek(self) -> Token:
        return self.toks[self.i]

    def take(self) -> Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok.kind == "name" and tok.text.lower() == word:
            self.i += 1
            return True
        return False

    def expect(self, text: str, what: str) -> Token:
        tok = self.take()
        if tok.text != text or tok.kind not in ("punct", "op"):
            raise self.fail(tok, f"expected {what}, got {_shown(tok)}")
        return tok

    def parse(self) -> Node:
        node = self.disjunction(0)
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail(tok, f"expected 'and', 'or' or the end, got {_shown(tok)}")
        return node

    def disjunction(self, depth: int) -> Node:
        parts = [self.conjunction(depth)]
        while self.keyword("or"):
            parts.append(self.conjunction(depth))
        return parts[0] if len(parts) == 1 else Logic("or", tuple(parts))

    def conjunction(self, depth: int) -> Node:
        parts = [self.negation(depth)]
        while self.keyword("and"):
            parts.append(self.negation(depth))
        return parts[0] if len(parts) == 1 else Logic("and", tuple(parts))

    def negation(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise self.fail(self.peek(), f"nested deeper than {MAX_DEPTH} levels")
        if self.keyword("not"):
            return Logic("not", (self.negation(depth + 1),))
        return self.atom(depth)

    def atom(self, depth: int) -> Node:
        tok = self.peek()
        if tok.kind == "punct" and tok.text == "(":
            self.take()
            node = self.disjunction(depth + 1)
            self.expect(")", "')'")
            return node
        column = self.column()
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise self.fail(tok, f"more than {MAX_TERMS} comparisons")
        negate = self.keyword("not")
        if negate or self.keyword("in"):
            if negate and not self.keyword("in"):
                raise self.fail(self.peek(), f"expected 'in' after 'not', got {_shown(self.peek())}")
            return Member(column, self.literal_list(), negate, tok.pos)
        op = self.take()
        if op.kind != "op":
            raise self.fail(op, f"expected a comparison (== != < <= > >=) or 'in' after column {column!r}, "
                                f"got {_shown(op)}")
        return Compare(column, op.text, self.literal(), tok.pos)

    def column(self) -> str:
        tok = self.take()
        if tok.kind == "quoted":
            return tok.text[1:-1]
        if tok.kind == "name" and tok.text.lower() not in KEYWORDS:
            return tok.text
        raise self.fail(tok, f"expected a column name, got {_shown(tok)}")

    def literal_list(self) -> tuple[Literal, ...]:
        self.expect("[", "'[' starting the list of values")
        values = [self.literal()]
        while self.peek().text == ",":
            self.take()
            values.append(self.literal())
            if len(values) > MAX_IN_VALUES:
                raise self.fail(self.peek(), f"more than {MAX_IN_VALUES} values in a list")
        self.expect("]", "',' or ']'")
        return tuple(values)

    def literal(self) -> Literal:
        tok = self.take()
        if tok.kind == "str":
            return re.sub(r"\\(.)", r"\1", tok.text[1:-1], flags=re.DOTALL)
        if tok.kind == "num":
            return float(tok.text) if re.search(r"[.eE]", tok.text) else int(tok.text)
        if tok.kind == "name" and tok.text.lower() in ("true", "false"):
            return tok.text.lower() == "true"
        raise self.fail(tok, f"expected a value (a quoted string, a number, true or false), got {_shown(tok)}")


def _shown(tok: Token) -> str:
    return "the end of the filter" if tok.kind == "end" else repr(tok.text)


def parse_filter(text: str, *, columns: Collection[str] | None = None, max_chars: int = MAX_FILTER_CHARS
                 ) -> Node:
    """Parse a filter string into a tree, or raise FilterError naming the position of the bad token.
    With `columns`, only those columns may be named (the service's allow-list)."""
    if not isinstance(text, str):
        raise TypeError(f"a filter string must be str, not {type(text).__name__}")
    if len(text) > max_chars:
        raise FilterError(text, max_chars, f"longer than {max_chars} characters")
    if not text.strip():
        raise FilterError(text, 0, "empty filter")
    node = _Parser(text).parse()
    for name, pos in _columns_of(node) if columns is not None else ():
        if name not in columns:
            raise FilterError(text, pos, f"column {name!r} cannot be filtered; filterable: {sorted(columns)}")
    return node


def _columns_of(node: Node) -> list[tuple[str, int]]:
    if isinstance(node, Logic):
        return [c for part in node.parts for c in _columns_of(part)]
    return [(node.column, node.pos)]


def _kind(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series.dtype):
        return "boolean"
    if pd.api.types.is_numeric_dtype(series.dtype):
        return "number"
    values = series.dropna()
    if all(isinstance(v, str) for v in values):
        return "string"
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return "boolean"
    return "mixed"


def _literal_kind(value: Literal) -> str:
    return "boolean" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"


def _evaluate(node: Node, frame: pd.DataFrame, text: str) -> np.ndarray:
    if isinstance(node, Logic):
        masks = [_evaluate(p, frame, text) for p in node.parts]
        if node.op == "not":
            return ~masks[0]
        return np.logical_and.reduce(masks) if node.op == "and" else np.logical_or.reduce(masks)
    if node.column not in frame.columns:
        raise FilterError(text, node.pos, f"no column {node.column!r}; columns: {list(map(str, frame.columns))}")
    series = frame[node.column]
    kind, values = _kind(series), node.values if isinstance(node, Member) else (node.value,)
    wrong = [v for v in values if _literal_kind(v) != kind]
    if wrong:
        raise FilterError(text, node.pos, f"column {node.column!r} holds {kind} values; "
                                          f"{wrong[0]!r} is a {_literal_kind(wrong[0])}")
    if isinstance(node, Member):
        mask = series.isin(list(values)).to_numpy(dtype=bool)
        return ~mask if node.negate else mask
    if kind == "boolean" and node.op not in ("==", "!="):
        raise FilterError(text, node.pos, f"column {node.column!r} is boolean: use == or !=")
    compare = {"==": series.eq, "!=": series.ne, "<": series.lt, "<=": series.le, ">": series.gt, ">=": series.ge}
    result = compare[node.op](node.value)
    return result.fillna(node.op == "!=").to_numpy(dtype=bool)


def filter_mask(filter: Union[str, Node], frame: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the rows of `frame` that a filter string (or a parsed tree) keeps."""
    if isinstance(filter, str):
        return _evaluate(parse_filter(filter), frame, filter)
    return _evaluate(filter, frame, "")
