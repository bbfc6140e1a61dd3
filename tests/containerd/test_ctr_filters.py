"""containerd's filter language (snapdriver.containerd.filters): grammar, semantics, garbage."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapdriver.containerd.filters import Filters, Op, Selector, parse, quote, snapshot_lookup
from snapdriver.errors import RequestError

BASE = snapshot_lookup("default/1/base", "", "committed", {})
CHILD = snapshot_lookup(
    "default/2/child",
    "default/1/base",
    "active",
    {"containerd.io/snapshot.ref": "sha256:abc", "a.b": "dotted", "empty": ""},
)


def listed(filters: list[str]) -> list[bool]:
    parsed = Filters.parse(filters)
    return [parsed.matches(BASE), parsed.matches(CHILD)]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], [True, True]),
        ([""], [True, True]),
        (["kind==committed"], [True, False]),
        (["kind==active"], [False, True]),
        (["kind!=active"], [True, False]),
        (["name==default/1/base"], [True, False]),
        (['name=="default/2/child"'], [False, True]),
        (["parent"], [True, True]),  # present even when empty, as in containerd
        (["parent==default/1/base"], [False, True]),
        (['parent==""'], [True, False]),
        (["labels"], [False, False]),
        (['labels."containerd.io/snapshot.ref"'], [False, True]),
        (['labels."containerd.io/snapshot.ref"==sha256:abc'], [False, True]),
        (["labels.a.b==dotted"], [False, True]),  # fields after labels join with "."
        (["labels.empty"], [False, True]),
        (["labels.missing!=x"], [True, True]),  # != is true for an absent field
        (["labels.missing==x"], [False, False]),
        (["labels.missing~=^$"], [True, True]),  # ~= sees "" for an absent field
        (["name~=child"], [False, True]),  # unanchored search
        (["name~=/1\\/base$/"], [True, False]),
        (["name~=|^default/2|"], [False, True]),
        (["kind==committed,name~=base"], [True, False]),
        (["kind==committed,name~=child"], [False, False]),
        (["kind==committed", "name~=child"], [True, True]),  # any filter
        (["nosuchfield"], [False, False]),
        (["nosuchfield!=x"], [True, True]),
        ([" kind == active"], [False, True]),
        (["kind==active, name"], [False, True]),
    ],
)
def test_semantics(filters: list[str], expected: list[bool]) -> None:
    assert listed(filters) == expected


def test_parse_shapes() -> None:
    assert parse('labels."x y"==v') == (Selector(("labels", "x y"), Op.EQUAL, "v"),)
    assert parse("a.b_1.2") == (Selector(("a", "b_1", "2"), Op.PRESENT),)
    assert parse('name=="a\\"b\\\\c\\n\\x41\\101\\u00e9\\U0001F600"')[0].value == 'a"b\\c\nAAé😀'
    assert parse("name==a.b=c!d~e")[0].value == "a.b=c!d~e"  # a bare value takes anything
    assert parse('name=="\\xc3\\xa9"')[0].value == "é"  # byte escapes decode as UTF-8


@pytest.mark.parametrize(
    "text",
    [
        "name==",
        "name ",
        "name==a b",
        "name==a ,b",
        ",",
        "name,",
        "name.",
        "==a",
        "name=a",
        "name===a",
        "name=!a",
        "name>a",
        "name==/a/",  # alternative quotes only after ~=
        "name==|a|",
        "name==,",
        "name==.a",
        'name=="a',
        'name=="a\nb"',
        'name=="\\q"',
        'name=="\\x4"',
        'name=="\\400"',
        'name=="\\U00110000"',
        'name=="\\xff"',
        "name~=(",
        "name~=/(/",
        "/name/",
        "labels.'k'",
        "labels.foo-bar",
        "na\0me",
        'name=="\0"',
        "name==a\0",
    ],
)
def test_malformed_filters_are_request_errors(text: str) -> None:
    with pytest.raises(RequestError, match="invalid filter"):
        Filters.parse(["kind==active", text])


_FIELD = st.one_of(st.from_regex(r"[A-Za-z0-9_]+", fullmatch=True), st.text(max_size=12))
_OPS = st.sampled_from([Op.PRESENT, Op.EQUAL, Op.NOT_EQUAL, Op.MATCHES])


@st.composite
def selectors(draw: st.DrawFn) -> Selector:
    path = tuple(draw(st.lists(_FIELD, min_size=1, max_size=3)))
    op = draw(_OPS)
    if op is Op.PRESENT:
        return Selector(path, op)
    if op is Op.MATCHES:
        value = draw(st.sampled_from(["", "a", "^x.*y$", "[0-9]+", "(a|b)"]))
        return Selector(path, op, value)
    return Selector(path, op, draw(st.text(max_size=16)))


def render(selector: Selector) -> str:
    path = ".".join(
        f if f and all(c.isascii() and (c.isalnum() or c == "_") for c in f) else quote(f)
        for f in selector.path
    )
    if selector.op is Op.PRESENT:
        return path
    return f"{path}{selector.op.value}{quote(selector.value)}"


@given(st.lists(selectors(), min_size=1, max_size=4))
def test_round_trip(found: list[Selector]) -> None:
    parsed = parse(",".join(render(s) for s in found))
    assert [(s.path, s.op, s.value) for s in parsed] == [(s.path, s.op, s.value) for s in found]


@given(st.text(max_size=40))
def test_garbage_never_crashes(text: str) -> None:
    try:
        parsed = Filters.parse([text])
    except RequestError:
        return
    parsed.matches(CHILD)


@given(st.text(alphabet='ab.,=!~"/|\\ x0', max_size=30))
def test_punctuation_never_crashes(text: str) -> None:
    with contextlib.suppress(RequestError):
        Filters.parse([text]).matches(BASE)
