"""The field rules: a TypedDict with Annotated rules, checked strictly, every failure located."""

from __future__ import annotations

from typing import Annotated, Any, NotRequired, TypedDict

import pytest

from service.errors import ValidationFailed
from web.schemas import Email, Length, Range, Text, body_validator


class Order(TypedDict):
    label: Annotated[str, Text(5)]
    count: Annotated[int, Range(1, 3)]
    email: NotRequired[Email]


class Batch(TypedDict):
    orders: Annotated[list[Order], Length(1, 2)]


order = body_validator(Order)
batch = body_validator(Batch)


def problems(validate: Any, body: Any) -> list[tuple[list[Any], str]]:
    with pytest.raises(ValidationFailed) as failed:
        validate(body)
    return [(detail["loc"], detail["msg"]) for detail in failed.value.details or ()]


def test_a_valid_body_comes_back_trimmed_and_lowered() -> None:
    assert order({"label": "  ab ", "count": 2, "email": "A@B.IO"}) == {
        "label": "ab",
        "count": 2,
        "email": "a@b.io",
    }


def test_a_not_required_field_may_be_left_out_under_postponed_annotations() -> None:
    """This module uses ``from __future__ import annotations``, where Python 3.11's own
    ``__required_keys__`` would count ``email`` as required."""
    assert order({"label": "ab", "count": 1}) == {"label": "ab", "count": 1}


@pytest.mark.parametrize("count", [True, 1.0, "1", None])
def test_only_a_json_integer_is_an_integer(count: object) -> None:
    assert problems(order, {"label": "ab", "count": count}) == [
        (["count"], "Input should be a valid integer")
    ]


def test_every_failing_value_is_reported_in_schema_order_then_the_extra_fields() -> None:
    assert problems(order, {"zz": 1, "label": "   ", "email": "no-at"}) == [
        (["label"], "String should have at least 1 character"),
        (["count"], "Field required"),
        (["email"], "an email needs exactly one @ with text on both sides"),
        (["zz"], "Extra inputs are not permitted"),
    ]


def test_text_rules_apply_after_trimming_and_refuse_nul() -> None:
    assert problems(order, {"label": "abcdef", "count": 4}) == [
        (["label"], "String should have at most 5 characters"),
        (["count"], "Input should be less than or equal to 3"),
    ]
    assert problems(order, {"label": "a\x00", "count": 0}) == [
        (["label"], "must not contain the NUL character (U+0000)"),
        (["count"], "Input should be greater than or equal to 1"),
    ]


def test_a_list_is_sized_before_its_entries_and_entries_are_located_by_index() -> None:
    assert problems(batch, {"orders": []}) == [
        (["orders"], "List should have at least 1 item in all, not 0")
    ]
    three = [{"label": "x"}] * 3
    assert problems(batch, {"orders": three}) == [
        (["orders"], "List should have at most 2 items in all, not 3")
    ]
    assert problems(batch, {"orders": [{"label": "a", "count": 1}, "x"]}) == [
        (["orders", 1], "Input should be a valid dictionary")
    ]
    assert problems(batch, {"orders": "ab"}) == [(["orders"], "Input should be a valid list")]
