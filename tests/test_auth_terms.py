"""The pure arithmetic of virtual keys: durations, budget periods, prices, the budget's words,
and the admin API's validation of a key's fields."""

from __future__ import annotations

import calendar

import pytest

from keel.auth._store import KeySpec, StoreError
from keel.auth._terms import (
    KEY_PREFIX,
    Rates,
    budget_message,
    cost,
    digest,
    money,
    new_secret,
    parse_duration,
    period_start,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90d", 90 * 86400),
        ("12h", 43200),
        ("30m", 1800),
        ("45s", 45),
        ("2w", 1209600),
        ("1.5h", 5400),
        ("600", 600),
        (600, 600),
        (0.5, 0.5),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "-1d", "0", 0, "1y", True, float("inf")])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


def _utc(*t: int) -> float:
    return float(calendar.timegm((*t, 0, 0, 0)))


def test_budget_periods_are_utc_calendar_periods() -> None:
    now = _utc(2026, 12, 17, 15, 4, 5)  # a Thursday
    assert period_start("month", now) == _utc(2026, 12, 1, 0, 0, 0)
    assert period_start("week", now) == _utc(2026, 12, 14, 0, 0, 0)  # Monday
    assert period_start("day", now) == _utc(2026, 12, 17, 0, 0, 0)
    assert period_start("total", now) == 0.0
    assert period_start("month", _utc(2027, 1, 1, 0, 0, 0)) == _utc(2027, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        period_start("year", now)


def test_cost_is_price_times_usage_with_cached_prompt_tokens() -> None:
    rates = Rates(input=0.15, output=0.60, cached_input=0.075)
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 400},
    }
    assert cost(usage, rates) == pytest.approx((600 * 0.15 + 400 * 0.075 + 500 * 0.60) / 1e6)
    assert cost({"prompt_tokens": 10, "completion_tokens": 2}, rates) == pytest.approx(
        (10 * 0.15 + 2 * 0.6) / 1e6
    )
    # Garbage in a usage report costs nothing rather than failing the request.
    assert cost({"prompt_tokens": "many", "completion_tokens": -3}, rates) == 0.0
    assert cost(
        {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 99}}, rates
    ) == pytest.approx(5 * 0.075 / 1e6)


def test_the_budget_is_said_plainly() -> None:
    assert budget_message("voice-bot", 50.0, "month") == (
        "budget of $50/month for key voice-bot reached"
    )
    assert budget_message("k", 12.5, "total") == "budget of $12.5 for key k reached"
    assert money(0.000125) == "$0.000125"


def test_secrets_and_digests() -> None:
    a, b = new_secret(KEY_PREFIX), new_secret(KEY_PREFIX)
    assert a != b and a.startswith("sk-keel-") and len(a) == 51
    assert digest(b"p" * 32, a) != digest(b"q" * 32, a)  # keyed: the pepper matters
    assert a not in digest(b"p" * 32, a)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x", "rpm": 0}, "rpm"),
        ({"name": "x", "tpm": 1.5}, "tpm"),
        ({"name": "x", "max_concurrency": True}, "max_concurrency"),
        ({"name": "x", "budget_usd": -1}, "budget_usd"),
        ({"name": "x", "budget_period": "year"}, "budget_period"),
        ({"name": "x", "models": [1]}, "models"),
        ({"name": "x", "expires": "later"}, "expires"),
        ({"name": "x", "key": "sk-mine"}, "key"),
    ],
)
def test_key_fields_are_validated(body: dict[str, object], param: str) -> None:
    with pytest.raises(StoreError) as err:
        KeySpec.from_json(body)
    assert err.value.status == 400 and err.value.param == param


def test_a_full_key_spec() -> None:
    spec = KeySpec.from_json(
        {
            "name": " voice-bot ",
            "models": "chat, qwen-plus",
            "rpm": 600,
            "budget_usd": 50,
            "budget_period": "week",
            "expires": "90d",
        }
    )
    assert spec == KeySpec(
        "voice-bot", ("chat", "qwen-plus"), 600, None, None, 50.0, "week", 90 * 86400.0
    )
