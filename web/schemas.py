"""Field rules of the HTTP contract, and validators that report every failing value."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from annotated_types import GroupedMetadata
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from db.models import MAX_BIGINT, MAX_INT
from service.errors import ValidationFailed

T = TypeVar("T")


def _email(value: str) -> str:
    local, at, domain = value.partition("@")
    if not at or not local or not domain or "@" in domain:
        raise ValueError("an email needs exactly one @ with text on both sides")
    lowered = value.lower()
    if len(lowered) > 254:
        raise ValueError("an email has at most 254 characters")
    return lowered


def _no_nul(value: str) -> str:
    # PostgreSQL cannot store U+0000 in text; refusing it here keeps SQLite, which can, honest.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


@dataclass(frozen=True)
class Text(GroupedMetadata):
    """``Annotated[str, Text(500)]``: 1 to 500 characters once surrounding white space is
    trimmed, without U+0000."""

    max_length: int

    def __iter__(self) -> Iterator[Any]:
        yield StringConstraints(strip_whitespace=True, min_length=1, max_length=self.max_length)
        yield AfterValidator(_no_nul)


UserName = Annotated[str, Text(100)]
ItemName = Annotated[str, Text(200)]
Email = Annotated[
    str, StringConstraints(max_length=254), AfterValidator(_no_nul), AfterValidator(_email)
]
Balance = Annotated[int, Field(ge=0, le=MAX_BIGINT)]
Quantity = Annotated[int, Field(ge=0, le=MAX_INT)]
Amount = Annotated[int, Field(ge=1, le=MAX_BIGINT)]
IdRef = Annotated[int, Field(ge=1, le=MAX_BIGINT)]

# Strict: JSON true/false and floats are not integers, and nothing is coerced.
STRICT = ConfigDict(extra="forbid", strict=True)


def body_validator(schema: type[T]) -> Callable[[Any], T]:
    """A function checking a parsed JSON body against ``schema``; raises ``ValidationFailed``."""
    adapter = TypeAdapter(schema)

    def validate(body: Any) -> T:
        try:
            return adapter.validate_python(body)
        except ValidationError as error:
            raise ValidationFailed(
                [{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
            ) from None

    return validate


_DIGITS = re.compile(r"[0-9]{1,30}")


def _whole_number(raw: str, low: int, high: int) -> int | None:
    """``raw`` as an integer when it is ASCII digits within ``low``..``high``, else None."""
    if _DIGITS.fullmatch(raw) and low <= int(raw) <= high:
        return int(raw)
    return None


def page_query(
    args: Mapping[str, str], filters: Mapping[str, Callable[[str], object]]
) -> dict[str, Any]:
    """``limit``, ``after`` and the given filters from a query string, or ``ValidationFailed``."""
    query: dict[str, Any] = {}
    problems: list[dict[str, Any]] = []
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
