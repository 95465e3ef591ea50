"""Field rules of the HTTP contract, and validators that report every failing value.

A body's shape is a ``TypedDict`` whose fields carry their rules in ``Annotated``::

    class NewTransfer(TypedDict):
        from_user_id: IdRef                     # Annotated[int, Range(1, MAX_BIGINT)]
        amount: Annotated[int, Range(1, 100)]
        note: NotRequired[Annotated[str, Text(500)]]

``body_validator(NewTransfer)`` reads the rules once, when the module declaring the schema
loads, and checks a parsed JSON body strictly: JSON ``true`` and ``1.0`` are not integers, no
value is coerced to another type, a field the schema does not name is an error, and every
failing value is reported with its location (``["items", 3, "quantity"]``). The checks are
plain Python: bodies this small need no validation library, and none is loaded at a cold start.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints, is_typeddict

from db.models import MAX_BIGINT, MAX_INT
from service.errors import ValidationFailed

T = TypeVar("T")

Problems = list[dict[str, Any]]
Check = Callable[[Any, list[Any], Problems], Any]

_INVALID = object()  # what a check returns for a value it reported


@dataclass(frozen=True)
class Range:
    """``Annotated[int, Range(1, 10)]``: an integer from ``low`` to ``high``."""

    low: int
    high: int


@dataclass(frozen=True)
class Text:
    """``Annotated[str, Text(500)]``: 1 to ``max_length`` characters once surrounding white
    space is trimmed (the value kept is trimmed), without U+0000."""

    max_length: int


@dataclass(frozen=True)
class Length:
    """``Annotated[list[X], Length(1, 1000)]``: a list of that many entries;
    ``Annotated[str, Length(high=254)]``: a string of at most that many characters."""

    low: int = 0
    high: int | None = None


@dataclass(frozen=True)
class Rule:
    """``Annotated[str, Rule(function)]``: the value ``function`` returns, checked after the
    other rules; it raises ``ValueError`` with the message to report."""

    function: Callable[[Any], Any]


def _no_nul(value: str) -> str:
    # PostgreSQL cannot store U+0000 in text; refusing it here keeps SQLite, which can, honest.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


def _email(value: str) -> str:
    local, at, domain = value.partition("@")
    if not at or not local or not domain or "@" in domain:
        raise ValueError("an email needs exactly one @ with text on both sides")
    lowered = value.lower()
    if len(lowered) > 254:
        raise ValueError("an email has at most 254 characters")
    return lowered


UserName = Annotated[str, Text(100)]
ItemName = Annotated[str, Text(200)]
Email = Annotated[str, Length(high=254), Rule(_no_nul), Rule(_email)]
Balance = Annotated[int, Range(0, MAX_BIGINT)]
Quantity = Annotated[int, Range(0, MAX_INT)]
Amount = Annotated[int, Range(1, MAX_BIGINT)]
IdRef = Annotated[int, Range(1, MAX_BIGINT)]


def body_validator(schema: type[T]) -> Callable[[Any], T]:
    """A function checking a parsed JSON body against ``schema``; raises ``ValidationFailed``
    listing every failing value."""
    check = _check_for(schema)

    def validate(body: Any) -> T:
        problems: Problems = []
        value = check(body, [], problems)
        if problems:
            raise ValidationFailed(problems)
        return value  # type: ignore[no-any-return]

    return validate


def _check_for(kind: Any) -> Check:
    """The check of one annotation: a TypedDict, ``int``, ``str``, ``list[X]``, ``Annotated``."""
    if get_origin(kind) is Annotated:
        base, *rules = get_args(kind)
        return _with_rules(base, rules)
    if is_typeddict(kind):
        return _typed_dict(kind)
    if kind is int:
        return _integer
    if kind is str:
        return _string
    if get_origin(kind) is list:
        return _list_of(_check_for(get_args(kind)[0]))
    raise TypeError(f"no check for {kind!r}")


def _report(problems: Problems, loc: list[Any], message: str) -> object:
    problems.append({"loc": loc, "msg": message})
    return _INVALID


def _typed_dict(schema: Any) -> Check:
    fields: dict[str, Check] = {}
    required: set[str] = set()
    for name, hint in get_type_hints(schema, include_extras=True).items():
        # Read here, not from __required_keys__: under ``from __future__ import annotations``
        # Python 3.11 counts a NotRequired field as required.
        marker = get_origin(hint)
        if marker is typing.Required or (marker is not typing.NotRequired and schema.__total__):
            required.add(name)
        inner = get_args(hint)[0] if marker in (typing.Required, typing.NotRequired) else hint
        fields[name] = _check_for(inner)

    def check(value: Any, loc: list[Any], problems: Problems) -> Any:
        if not isinstance(value, dict):
            return _report(problems, loc, "Input should be a valid dictionary")
        reported = len(problems)
        checked: dict[str, Any] = {}
        for name, field in fields.items():
            if name in value:
                checked[name] = field(value[name], [*loc, name], problems)
            elif name in required:
                _report(problems, [*loc, name], "Field required")
        for name in value:
            if name not in fields:
                _report(problems, [*loc, name], "Extra inputs are not permitted")
        return _INVALID if len(problems) > reported else checked

    return check


def _integer(value: Any, loc: list[Any], problems: Problems) -> Any:
    if type(value) is not int:  # bool is an int to Python, not to JSON
        return _report(problems, loc, "Input should be a valid integer")
    return value


def _string(value: Any, loc: list[Any], problems: Problems) -> Any:
    if not isinstance(value, str):
        return _report(problems, loc, "Input should be a valid string")
    return value


def _list_of(item: Check) -> Check:
    def check(value: Any, loc: list[Any], problems: Problems) -> Any:
        if not isinstance(value, list):
            return _report(problems, loc, "Input should be a valid list")
        results = [item(entry, [*loc, index], problems) for index, entry in enumerate(value)]
        return _INVALID if any(result is _INVALID for result in results) else results

    return check


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _with_rules(kind: Any, rules: list[Any]) -> Check:
    """The check of ``kind``, then each rule in order; the first failing one is reported.
    A list's ``Length`` is checked before its entries."""
    base = _check_for(kind)
    steps: list[Callable[[Any], Any]] = []
    sized: Length | None = None
    for rule in rules:
        if isinstance(rule, Range):
            steps.append(_in_range(rule))
        elif isinstance(rule, Text):
            steps += [_trimmed_text(rule.max_length), _value_error(_no_nul)]
        elif isinstance(rule, Length) and get_origin(kind) is list:
            sized = rule
        elif isinstance(rule, Length):
            steps.append(_sized(rule))
        elif isinstance(rule, Rule):
            steps.append(_value_error(rule.function))
        else:
            raise TypeError(f"unknown rule {rule!r}")

    def check(value: Any, loc: list[Any], problems: Problems) -> Any:
        if sized is not None and isinstance(value, list):
            message = _list_size_problem(len(value), sized)
            if message is not None:
                return _report(problems, loc, message)
        value = base(value, loc, problems)
        if value is _INVALID:
            return value
        try:
            for step in steps:
                value = step(value)
        except _Refused as refused:
            return _report(problems, loc, str(refused))
        return value

    return check


class _Refused(Exception):
    """A rule's message for the value it refused."""


def _list_size_problem(size: int, rule: Length) -> str | None:
    if rule.high is not None and size > rule.high:
        return f"List should have at most {_plural(rule.high, 'item')} in all, not {size}"
    if size < rule.low:
        return f"List should have at least {_plural(rule.low, 'item')} in all, not {size}"
    return None


def _sized(rule: Length) -> Callable[[str], str]:
    def check(value: str) -> str:
        if rule.high is not None and len(value) > rule.high:
            raise _Refused(f"String should have at most {_plural(rule.high, 'character')}")
        if len(value) < rule.low:
            raise _Refused(f"String should have at least {_plural(rule.low, 'character')}")
        return value

    return check


def _in_range(rule: Range) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < rule.low:
            raise _Refused(f"Input should be greater than or equal to {rule.low}")
        if value > rule.high:
            raise _Refused(f"Input should be less than or equal to {rule.high}")
        return value

    return check


def _trimmed_text(max_length: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        value = value.strip()
        if not value:
            raise _Refused("String should have at least 1 character")
        if len(value) > max_length:
            raise _Refused(f"String should have at most {_plural(max_length, 'character')}")
        return value

    return check


def _value_error(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        try:
            return function(value)
        except ValueError as error:
            raise _Refused(str(error)) from None

    return check


_DIGITS = re.compile(r"[0-9]{1,30}")


def _whole_number(raw: str, low: int, high: int) -> int | None:
    """``raw`` as an integer when it is ASCII digits within ``low``..``high``, else None."""
    if _DIGITS.fullmatch(raw) and low <= int(raw) <= high:
        return int(raw)
    return None


def page_query(
    args: Mapping[str, str], filters: Mapping[str, Callable[[str], object]]
) -> dict[str, Any]:
    """``limit``, ``after`` and the given filters from a query string, or ``ValidationFailed``.

    A parameter the listing does not take, or one given twice, is refused rather than ignored:
    a misspelt filter (``userid`` for ``user_id``) must not widen the answer to everything.
    """
    query: dict[str, Any] = {}
    problems: list[dict[str, Any]] = []
    taken = ("limit", "after", *filters)
    for name in args:
        if name not in taken:
            problems.append(
                {
                    "loc": ["query", name],
                    "msg": f"is not a parameter of this listing, which takes {_listed(taken)}",
                }
            )
        elif len(_values(args, name)) > 1:
            problems.append({"loc": ["query", name], "msg": "must be given at most once"})
    for name, low, high, default in (("limit", 1, 1000, 50), ("after", 0, MAX_BIGINT, 0)):
        raw = args.get(name)
        value = default if raw is None else _whole_number(raw, low, high)
        if value is not None:
            query[name] = value
        else:
            problems.append(
                {"loc": ["query", name], "msg": f"must be a whole number from {low} to {high}"}
            )
    for name, parse in filters.items():
        raw = args.get(name)
        if raw is None:
            continue
        try:
            query[name] = parse(raw)
        except ValueError as error:
            problems.append({"loc": ["query", name], "msg": str(error)})
    if problems:
        raise ValidationFailed(problems)
    return query


def _values(args: Mapping[str, str], name: str) -> list[str]:
    """Every value of ``name`` in a query string (a Werkzeug ``MultiDict`` keeps them all)."""
    values = getattr(args, "getlist", None)
    return list(values(name)) if values is not None else [args[name]]


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def email_filter(raw: str) -> str:
    """An email given in a query string."""
    return _no_nul(raw)


def id_parameter(raw: str) -> int:
    """An id given in a query string."""
    value = path_id(raw)
    if value is None:
        raise ValueError(f"must be an id from 1 to {MAX_BIGINT}")
    return value


def path_id(raw: str) -> int | None:
    """The id in a path segment, or None when the segment is not an id."""
    return _whole_number(raw, 1, MAX_BIGINT)
