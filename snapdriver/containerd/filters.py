"""containerd's filter language, as ``List`` receives it.

A request carries a list of filter strings; a snapshot is listed if ANY of them matches (an empty
list, or an empty string, matches everything). One filter is selectors separated by ``,``, all of
which must match::

    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | "double-quoted"
    operator  := "==" | "!=" | "~="
    value     := bare (no space or ",") | "double-quoted" | (after ~= only) /quoted/ or |quoted|

Quoted text takes Go's escapes (``\\n``, ``\\"``, ``\\x41``, ``\\101``, ``\\u00e9``, ...).
Semantics follow containerd's ``filters`` package and its snapshot adaptor:

- a bare field tests presence. ``name``, ``parent`` and ``kind`` are always present (``parent``
  even when empty); ``labels.KEY`` is present when the label exists. Fields after ``labels`` are
  joined with ``.`` into one key, so ``labels.a.b`` is the label ``a.b``;
- ``==`` needs the field present and equal; ``!=`` is true for an absent field;
- ``~=`` searches (unanchored) the field's value, ``""`` if absent, with Python's ``re``;
- ``kind`` is ``active``, ``view`` or ``committed``; unknown fields are absent, not an error.

Deviation: containerd compiles a regexp at match time and treats a bad one as "no match"; here a
bad regexp is a :class:`~snapdriver.errors.RequestError` at parse time, like any other malformed
filter, so the caller sees INVALID_ARGUMENT instead of a silently empty list.
"""

from __future__ import annotations

import enum
import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from snapdriver.errors import RequestError

#: Looks up a field path on one object: (value, present).
Lookup = Callable[[Sequence[str]], tuple[str, bool]]

# Go's unicode.IsSpace: Latin-1 spaces plus the White_Space property beyond Latin-1. Python's
# str.isspace() also takes \x1c-\x1f, which Go does not.
_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
_QUOTES = '/|"'
_OPERATOR_CHARS = "=!~"
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


class Op(enum.StrEnum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: Op
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, lookup: Lookup) -> bool:
        value, present = lookup(self.path)
        if self.op is Op.PRESENT:
            return present
        if self.op is Op.EQUAL:
            return present and value == self.value
        if self.op is Op.NOT_EQUAL:
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


class _Kind(enum.Enum):
    EOF = "end of input"
    QUOTED = "quoted text"
    VALUE = "value"
    FIELD = "field"
    SEPARATOR = "separator"
    OPERATOR = "operator"
    OTHER = "character"


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    text: str
    pos: int


def _is_field_char(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


def _is_value_char(ch: str) -> bool:
    # Go: not ',' nor space, and a letter, digit, number, graphic or punctuation rune.
    return ch != "," and ch not in _SPACE and unicodedata.category(ch)[0] in "LMNPS"


class _Parser:
    """One filter string: a scanner and a recursive-descent parser over it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.after_operator = False  # the next unquoted token is a value, not a field

    def fail(self, pos: int, message: str) -> RequestError:
        shown = self.text if len(self.text) <= 200 else self.text[:197] + "..."
        return RequestError(f"invalid filter {shown!r}: at offset {pos}: {message}")

    def peek(self) -> str:
        """The next character, spaces included; "" at the end."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def scan(self) -> _Token:
        text = self.text
        while self.pos < len(text) and text[self.pos] in _SPACE:
            self.pos += 1
        start = self.pos
        if start >= len(text):
            return _Token(_Kind.EOF, "", start)
        ch = text[start]
        if ch == "\0":
            raise self.fail(start, "unexpected NUL character")
        if ch in _QUOTES:
            return _Token(_Kind.QUOTED, self.scan_quoted(ch), start)
        self.pos += 1
        if ch in ",.":
            self.after_operator = False
            return _Token(_Kind.SEPARATOR, ch, start)
        if ch in _OPERATOR_CHARS:
            self.consume(lambda c: c in _OPERATOR_CHARS)
            self.after_operator = True
            return _Token(_Kind.OPERATOR, text[start : self.pos], start)
        if self.after_operator:
            self.consume(_is_value_char)
            self.after_operator = False
            return _Token(_Kind.VALUE, text[start : self.pos], start)
        if _is_field_char(ch):
            self.consume(_is_field_char)
            return _Token(_Kind.FIELD, text[start : self.pos], start)
        return _Token(_Kind.OTHER, ch, start)

    def consume(self, accept: Callable[[str], bool]) -> None:
        while self.pos < len(self.text) and accept(self.text[self.pos]):
            self.pos += 1

    def scan_quoted(self, quote: str) -> str:
        """Decode quoted text starting at ``self.pos``; return it with the quote char first."""
        start = self.pos
        self.pos += 1
        out = bytearray()
        while True:
            ch = self.peek()
            if ch in ("", "\n", "\0"):
                raise self.fail(start, "quoted text is not terminated")
            self.pos += 1
            if ch == quote:
                break
            if ch == "\\":
                out += self.escape(quote)
            else:
                out += ch.encode()
        try:
            return quote + out.decode()
        except UnicodeDecodeError:
            raise self.fail(start, "quoted text escapes bytes that are not UTF-8") from None

    def escape(self, quote: str) -> bytes:
        pos = self.pos - 1
        ch = self.peek()
        self.pos += 1
        if ch in _SIMPLE_ESCAPES:
            return bytes([_SIMPLE_ESCAPES[ch]])
        if ch == quote:
            return ch.encode()
        if ch in _HEX_DIGITS:
            digits = self.text[self.pos : self.pos + _HEX_DIGITS[ch]]
            self.pos += len(digits)
            if len(digits) < _HEX_DIGITS[ch] or not all(c in string.hexdigits for c in digits):
                raise self.fail(pos, f"escape \\{ch} needs {_HEX_DIGITS[ch]} hex digits")
            number = int(digits, 16)
            if ch == "x":
                return bytes([number])
            if number > 0x10FFFF:
                raise self.fail(pos, f"escape \\{ch}{digits} is beyond Unicode")
            # Go encodes a lone surrogate as U+FFFD.
            return (chr(number) if not 0xD800 <= number < 0xE000 else "\ufffd").encode()
        if ch and ch in "01234567":
            digits = ch + self.text[self.pos : self.pos + 2]
            self.pos += len(digits) - 1
            if len(digits) < 3 or not all(c in "01234567" for c in digits) or int(digits, 8) > 255:
                raise self.fail(pos, "octal escape needs three digits up to \\377")
            return bytes([int(digits, 8)])
        raise self.fail(pos, f"illegal escape sequence \\{ch}")

    def unquote(self, token: _Token, alternatives: bool) -> str:
        if token.text[0] != '"' and not alternatives:
            raise self.fail(token.pos, f"{token.text[0]}...{token.text[0]} quotes only follow ~=")
        return token.text[1:]

    # -- grammar --------------------------------------------------------------------------------

    def selectors(self) -> tuple[Selector, ...]:
        found = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(found)
            if ch != ",":
                raise self.fail(self.pos, f"unexpected {ch!r}: expected ',' or the end")
            self.scan()
            found.append(self.selector())

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.peek() in ("", ","):
            return Selector(path, Op.PRESENT)
        token = self.scan()
        if token.kind is not _Kind.OPERATOR:
            raise self.fail(
                token.pos, f"expected an operator (==, != or ~=), got {token.kind.value}"
            )
        try:
            op = Op(token.text)
        except ValueError:
            raise self.fail(token.pos, f"unsupported operator {token.text!r}") from None
        if op is Op.PRESENT:
            raise self.fail(token.pos, f"unsupported operator {token.text!r}")
        value = self.value(op is Op.MATCHES)
        if op is not Op.MATCHES:
            return Selector(path, op, value)
        try:
            return Selector(path, op, value, re.compile(value))
        except (re.error, RecursionError, OverflowError) as err:
            raise self.fail(token.pos, f"bad regular expression {value!r}: {err}") from None

    def fieldpath(self) -> tuple[str, ...]:
        path = [self.field()]
        while self.peek() == ".":
            self.scan()
            path.append(self.field())
        return tuple(path)

    def field(self) -> str:
        token = self.scan()
        if token.kind is _Kind.FIELD:
            return token.text
        if token.kind is _Kind.QUOTED:
            return self.unquote(token, alternatives=False)
        raise self.fail(token.pos, f"expected a field name or quoted text, got {token.kind.value}")

    def value(self, alternatives: bool) -> str:
        token = self.scan()
        if token.kind in (_Kind.VALUE, _Kind.FIELD):
            return token.text
        if token.kind is _Kind.QUOTED:
            return self.unquote(token, alternatives)
        raise self.fail(token.pos, f"expected a value or quoted text, got {token.kind.value}")


def parse(text: str) -> tuple[Selector, ...]:
    """One filter: its selectors, all of which must match (none: matches everything)."""
    if text == "":
        return ()
    return _Parser(text).selectors()


@dataclass(frozen=True)
class Filters:
    """A parsed request: matches when any filter does, or when there are none."""

    alternatives: tuple[tuple[Selector, ...], ...]

    @classmethod
    def parse(cls, texts: Sequence[str]) -> Filters:
        return cls(tuple(parse(text) for text in texts))

    def matches(self, lookup: Lookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(lookup) for s in one) for one in self.alternatives)


def snapshot_lookup(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Lookup:
    """The fields of one snapshot, as containerd's snapshot adaptor exposes them."""

    def lookup(path: Sequence[str]) -> tuple[str, bool]:
        head = path[0] if path else ""
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "kind":
            return kind, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return lookup


def quote(text: str) -> str:
    """``text`` as a double-quoted filter literal (any string, escaped as Go would read it)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif not ch.isprintable():  # NUL and newlines cannot appear raw
            out.append(f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
