"""Retry hints (keel._hints): Go durations, retry-after headers, message text, reset headers.
Header variants are those of shared/faults.md §1, "Headers worth reading"."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from keel._hints import parse_go_duration, retry_after_hint, retry_after_hint_with_source

# 2015-10-21T07:27:50Z, ten seconds before the RFC 9110 example date.
NOW = 1445412470.0
HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"


# --- parse_go_duration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("644ms", 0.644),
        ("12ms", 0.012),
        ("1h2m3.5s", 3723.5),
        ("20us", 0.00002),
        ("20\u00b5s", 0.00002),  # MICRO SIGN
        ("20\u03bcs", 0.00002),  # GREEK SMALL LETTER MU
        ("300ns", 3e-7),
        ("1.5h", 5400.0),
        ("1m30s", 90.0),
        ("0.5s", 0.5),
        (".5s", 0.5),
        ("0", 0.0),
        ("0s", 0.0),
        ("+1s", 1.0),
        (" 2s ", 2.0),
        # plain seconds, as some providers send
        ("2", 2.0),
        ("0.5", 0.5),
        ("17", 17.0),
    ],
)
def test_parse_go_duration_valid(text: str, expected: float) -> None:
    assert parse_go_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["-1", "-1s", "", "   ", "s", "ms", "garbage", "1x", "1s2", "1 s", "1e3", "inf", "nan", "1,5s"],
)
def test_parse_go_duration_invalid(text: str) -> None:
    assert parse_go_duration(text) is None


def test_parse_go_duration_overflow_is_none() -> None:
    assert parse_go_duration("9" * 400) is None
    assert parse_go_duration("9" * 400 + "h") is None


# --- header sources -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, (1.5, "retry-after-ms")),
        ({"retry-after-ms": "0"}, (0.0, "retry-after-ms")),
        ({"retry-after": "2"}, (2.0, "retry-after")),
        ({"retry-after": "0"}, (0.0, "retry-after")),
        ({"retry-after": "1.5"}, (1.5, "retry-after")),
        ({"retry-after": HTTP_DATE}, (10.0, "retry-after")),
        ({"retry-after": "Wed, 21 Oct 2015 07:00:00 GMT"}, (0.0, "retry-after")),  # past
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 -0000"}, (10.0, "retry-after")),
        # retry-after-ms beats retry-after
        ({"retry-after": "20", "retry-after-ms": "250"}, (0.25, "retry-after-ms")),
        # garbage / negative ms falls through to retry-after
        ({"retry-after": "20", "retry-after-ms": "soon"}, (20.0, "retry-after")),
        ({"retry-after": "20", "retry-after-ms": "-5"}, (20.0, "retry-after")),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: tuple[float, str]) -> None:
    assert retry_after_hint_with_source(headers, "", NOW) == expected
    assert retry_after_hint(headers, "", NOW) == expected[0]


@pytest.mark.parametrize(
    "value", ["-1", "soon", "", "inf", "nan", "1e3", "Wed, 99 Foo 2015 07:28:00 GMT"]
)
def test_retry_after_garbage_is_ignored(value: str) -> None:
    assert retry_after_hint({"retry-after": value}, "", NOW) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "3"},
        {"RETRY-AFTER": "3"},
        {"rEtRy-AfTeR": "3"},
        CIMultiDictProxy(CIMultiDict([("Retry-After", "3")])),
    ],
    ids=["title", "upper", "mixed", "aiohttp-proxy"],
)
def test_header_lookup_is_case_insensitive(headers: Mapping[str, str]) -> None:
    assert retry_after_hint(headers, "", NOW) == 3.0


def test_multidict_first_value_wins() -> None:
    headers = CIMultiDictProxy(CIMultiDict([("retry-after", "3"), ("Retry-After", "9")]))
    assert retry_after_hint(headers, "", NOW) == 3.0


# --- message text -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): "
            "Limit 30000, Used 29500, Requested 900. Please try again in 644ms. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            0.644,
        ),
        ("Please try again in 1.5s.", 1.5),
        ("Please try again in 6m0s.", 360.0),
        ("Please try again in 1m30.5s", 90.5),
        ("Please try again in 20s", 20.0),
        ("Please try again in 7.5 seconds.", 7.5),
        ("Please try again in 2 minutes.", 120.0),
        ("Please try again in 500 milliseconds", 0.5),
        ("try again in 1 hour", 3600.0),
        ("TRY AGAIN IN 644MS", 0.644),
        (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
            "2024-02-01 have exceeded token rate limit of your current AIServices S0 pricing "
            "tier. Please retry after 86400 seconds. Please contact Azure support service if "
            "you would like to further increase the default rate limit.",
            86400.0,
        ),
        ("retry after 20 seconds", 20.0),
        ("Please retry after 1 second.", 1.0),
        ("retry in 3s", 3.0),
    ],
)
def test_message_hint(message: str, expected: float) -> None:
    assert retry_after_hint_with_source({}, message, NOW) == (expected, "message")


@pytest.mark.parametrize(
    "message",
    [
        "",
        "Too many requests in route. Please try again later.",
        "Please try again in a moment",
        "retry after 3 attempts",
        "The server had an error while processing your request. Sorry about that!",
        "Wait 5 seconds",  # no "try again"/"retry": not a hint
    ],
)
def test_message_without_hint(message: str) -> None:
    assert retry_after_hint({}, message, NOW) is None


def test_header_beats_message() -> None:
    assert retry_after_hint_with_source(
        {"retry-after": "4"}, "Please try again in 644ms.", NOW
    ) == (4.0, "retry-after")


def test_message_beats_reset_headers() -> None:
    headers = {"x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-reset-requests": "1s"}
    assert retry_after_hint_with_source(headers, "Please try again in 644ms.", NOW) == (
        0.644,
        "message",
    )


# --- x-ratelimit-reset-* (Go durations) --------------------------------------------------------

BOTH_RESETS = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}


@pytest.mark.parametrize(
    ("headers", "limit", "expected"),
    [
        # the limit named by the 429 (OpenAI's type) picks its header
        (BOTH_RESETS, "tokens", (360.0, "x-ratelimit-reset-tokens")),
        (BOTH_RESETS, "requests", (1.0, "x-ratelimit-reset-requests")),
        # unknown limit: the exhausted one, by x-ratelimit-remaining-* == 0
        (
            {
                **BOTH_RESETS,
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-remaining-tokens": "9",
            },
            None,
            (1.0, "x-ratelimit-reset-requests"),
        ),
        (
            {
                **BOTH_RESETS,
                "x-ratelimit-remaining-requests": "5",
                "x-ratelimit-remaining-tokens": "0",
            },
            None,
            (360.0, "x-ratelimit-reset-tokens"),
        ),
        # still ambiguous: the larger, safe one
        (BOTH_RESETS, None, (360.0, "x-ratelimit-reset-tokens")),
        (
            {
                **BOTH_RESETS,
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-remaining-tokens": "0",
            },
            None,
            (360.0, "x-ratelimit-reset-tokens"),
        ),
        # the named limit has no usable header: fall back to the others
        ({"x-ratelimit-reset-requests": "12ms"}, "tokens", (0.012, "x-ratelimit-reset-requests")),
        ({"X-RateLimit-Reset-Tokens": "644ms"}, None, (0.644, "x-ratelimit-reset-tokens")),
        # plain seconds
        ({"x-ratelimit-reset-requests": "2"}, None, (2.0, "x-ratelimit-reset-requests")),
        # Azure's -1 / 0 mean "no value": ignored, the other one wins
        (
            {"x-ratelimit-reset-requests": "-1", "x-ratelimit-reset-tokens": "12ms"},
            None,
            (0.012, "x-ratelimit-reset-tokens"),
        ),
        (
            {"x-ratelimit-reset-requests": "0", "x-ratelimit-reset-tokens": "12ms"},
            "requests",
            (0.012, "x-ratelimit-reset-tokens"),
        ),
    ],
)
def test_ratelimit_reset_headers(
    headers: dict[str, str], limit: str | None, expected: tuple[float, str]
) -> None:
    assert retry_after_hint_with_source(headers, "", NOW, limit=limit) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-reset-requests": "-1", "x-ratelimit-reset-tokens": "-1"},
        {"x-ratelimit-reset-requests": "0", "x-ratelimit-reset-tokens": "0s"},
        {"x-ratelimit-reset-requests": "garbage"},
        {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0"},
    ],
)
def test_unusable_reset_headers(headers: dict[str, str]) -> None:
    assert retry_after_hint(headers, "", NOW) is None


def test_reset_headers_can_be_switched_off() -> None:
    headers = {**BOTH_RESETS, "anthropic-ratelimit-requests-reset": "2015-10-21T07:28:00Z"}
    assert retry_after_hint(headers, "", NOW, use_reset_headers=False) is None
    # explicit waits still count
    assert (
        retry_after_hint({**headers, "retry-after": "5"}, "", NOW, use_reset_headers=False) == 5.0
    )
    assert retry_after_hint(headers, "try again in 3s", NOW, use_reset_headers=False) == 3.0


# --- anthropic-ratelimit-*-reset (RFC 3339) ----------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"anthropic-ratelimit-requests-reset": "2015-10-21T07:28:00Z"},
            (10.0, "anthropic-ratelimit-requests-reset"),
        ),
        (
            {"anthropic-ratelimit-tokens-reset": "2015-10-21T15:28:30+08:00"},
            (40.0, "anthropic-ratelimit-tokens-reset"),
        ),
        (  # no zone: UTC
            {"anthropic-ratelimit-input-tokens-reset": "2015-10-21T07:28:05"},
            (15.0, "anthropic-ratelimit-input-tokens-reset"),
        ),
        (  # in the past: already reset
            {"anthropic-ratelimit-output-tokens-reset": "2015-10-21T07:00:00Z"},
            (0.0, "anthropic-ratelimit-output-tokens-reset"),
        ),
        (  # the exhausted limit wins over a later reset of a limit with room
            {
                "anthropic-ratelimit-requests-reset": "2015-10-21T07:28:00Z",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-tokens-reset": "2015-10-21T07:29:00Z",
                "anthropic-ratelimit-tokens-remaining": "12000",
            },
            (10.0, "anthropic-ratelimit-requests-reset"),
        ),
        (  # ambiguous: the larger
            {
                "anthropic-ratelimit-requests-reset": "2015-10-21T07:28:00Z",
                "anthropic-ratelimit-tokens-reset": "2015-10-21T07:29:00Z",
            },
            (70.0, "anthropic-ratelimit-tokens-reset"),
        ),
        (  # garbage one ignored
            {
                "anthropic-ratelimit-requests-reset": "tomorrow",
                "anthropic-ratelimit-tokens-reset": "2015-10-21T07:28:00Z",
            },
            (10.0, "anthropic-ratelimit-tokens-reset"),
        ),
    ],
)
def test_anthropic_reset_headers(headers: dict[str, str], expected: tuple[float, str]) -> None:
    assert retry_after_hint_with_source(headers, "", NOW) == expected


def test_openai_reset_beats_anthropic_reset() -> None:
    headers = {
        "x-ratelimit-reset-tokens": "2s",
        "anthropic-ratelimit-tokens-reset": "2015-10-21T07:29:00Z",
    }
    assert retry_after_hint_with_source(headers, "", NOW) == (2.0, "x-ratelimit-reset-tokens")


def test_no_hint_at_all() -> None:
    assert retry_after_hint({}, "", NOW) is None
    assert retry_after_hint_with_source({"content-type": "application/json"}, "", NOW) is None


@given(
    headers=st.dictionaries(
        st.sampled_from(
            [
                "retry-after",
                "Retry-After-Ms",
                "x-ratelimit-reset-tokens",
                "x-ratelimit-reset-requests",
                "anthropic-ratelimit-tokens-reset",
            ]
        ),
        st.text(max_size=30),
    ),
    message=st.text(max_size=60),
)
def test_never_raises_and_never_negative(headers: dict[str, str], message: str) -> None:
    hint = retry_after_hint(headers, message, NOW)
    assert hint is None or hint >= 0.0
