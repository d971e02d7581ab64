"""Error classification (keel._classify): every row of shared/faults.md §1, the mid-stream error
frames of §2, transport failures, key scrubbing and the client-facing verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel import _classify
from keel._classify import (
    Dialect,
    ErrorKind,
    UpstreamError,
    classify_response,
    classify_stream_error,
    scrub_secrets,
    transport_error,
)

NOW = 1445412470.0  # 2015-10-21T07:27:50Z
HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
HTML_504 = b"<!DOCTYPE html><html><body><h1>504 Gateway Time-out</h1></body></html>"


def openai_body(
    message: str, type_: str | None = None, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic_body(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


@dataclass(frozen=True)
class Row:
    """One faults.md §1 row and the complete verdict keel must reach."""

    dialect: Dialect
    status: int
    body: dict[str, Any] | bytes
    kind: ErrorKind
    retryable: bool
    failover: bool
    client_status: int
    client_type: str
    client_code: str | None
    headers: tuple[tuple[str, str], ...] = ()
    retry_after: float | None = None
    disable_key_for: float | None = None
    param: str | None = None


def rate_limited(
    dialect: Dialect, body: dict[str, Any] | bytes, retry_after: float | None = None, **kw: Any
) -> Row:
    return Row(
        dialect,
        kw.pop("status", 429),
        body,
        ErrorKind.RATE_LIMIT,
        True,
        True,
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        retry_after=retry_after,
        **kw,
    )


def quota(dialect: Dialect, status: int, body: dict[str, Any] | bytes) -> Row:
    return Row(
        dialect,
        status,
        body,
        ErrorKind.QUOTA,
        False,
        True,
        502,
        "upstream_quota_error",
        "insufficient_quota",
        disable_key_for=3600.0,
    )


def auth(dialect: Dialect, status: int, body: dict[str, Any] | bytes, **kw: Any) -> Row:
    return Row(
        dialect,
        status,
        body,
        ErrorKind.AUTH,
        False,
        True,
        502,
        "upstream_auth_error",
        "upstream_auth_error",
        disable_key_for=300.0,
        **kw,
    )


def overloaded(dialect: Dialect, status: int, body: dict[str, Any] | bytes, **kw: Any) -> Row:
    return Row(
        dialect,
        status,
        body,
        ErrorKind.OVERLOADED,
        True,
        True,
        503,
        "server_error",
        "server_is_overloaded",
        **kw,
    )


def server(dialect: Dialect, status: int, body: dict[str, Any] | bytes) -> Row:
    return Row(
        dialect,
        status,
        body,
        ErrorKind.SERVER,
        True,
        True,
        502,
        "server_error",
        "upstream_server_error",
    )


def invalid(
    dialect: Dialect, status: int, body: dict[str, Any] | bytes, code: str | None, **kw: Any
) -> Row:
    return Row(
        dialect,
        status,
        body,
        ErrorKind.INVALID_REQUEST,
        False,
        False,
        400,
        "invalid_request_error",
        code,
        **kw,
    )


OA, DS, AN, AZ = Dialect.OPENAI, Dialect.DASHSCOPE, Dialect.ANTHROPIC, Dialect.AZURE

OPENAI_QUOTA_MSG = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
DASHSCOPE_TPM_MSG = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://help.aliyun.com/zh/model-studio/error-code#token-limit"
)

ROWS: dict[str, Row] = {
    # --- OpenAI ---
    "openai-401-invalid_api_key": auth(
        OA,
        401,
        openai_body(
            "Incorrect API key provided: sk-proj-****************************************wxyz. "
            "You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        # x-should-retry is irrelevant for a bad key
        headers=(("x-should-retry", "true"),),
    ),
    "openai-429-requests": rate_limited(
        OA,
        openai_body(
            "Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): "
            "Limit 500, Used 500, Requested 1. Please try again in 120ms.",
            "requests",
            "rate_limit_exceeded",
        ),
        0.12,
    ),
    "openai-429-tokens": rate_limited(
        OA,
        openai_body(
            "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): "
            "Limit 30000, Used 29500, Requested 900. Please try again in 644ms.",
            "tokens",
            "rate_limit_exceeded",
        ),
        0.644,
        headers=(("x-ratelimit-reset-tokens", "1s"), ("x-ratelimit-reset-requests", "12ms")),
    ),
    "openai-429-tokens-hint-from-reset-header": rate_limited(
        OA,
        openai_body(
            "Rate limit reached for gpt-4o on tokens per min (TPM).",
            "tokens",
            "rate_limit_exceeded",
        ),
        6.5,
        headers=(("x-ratelimit-reset-tokens", "6.5s"), ("x-ratelimit-reset-requests", "12ms")),
    ),
    "openai-429-request-too-large": Row(
        OA,
        429,
        openai_body(
            "Request too large for gpt-4 in organization org-abc on tokens per min (TPM): Limit "
            "10000, Requested 20000. The input or output tokens must be reduced in order to run "
            "successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
            "tokens",
            "rate_limit_exceeded",
        ),
        ErrorKind.REQUEST_TOO_LARGE,
        False,
        True,
        413,
        "invalid_request_error",
        "request_too_large",
        headers=(("retry-after", "1"),),
    ),
    "openai-429-insufficient_quota": quota(
        OA, 429, openai_body(OPENAI_QUOTA_MSG, "insufficient_quota", "insufficient_quota")
    ),
    "openai-429-insufficient_quota-old-code-null": quota(
        OA, 429, openai_body(OPENAI_QUOTA_MSG, "insufficient_quota", None)
    ),
    "openai-429-quota-message-only": quota(OA, 429, openai_body(OPENAI_QUOTA_MSG)),
    "openai-429-credit_balance_exhausted": quota(
        OA,
        429,
        openai_body(
            "Your credit balance is exhausted.", "insufficient_quota", "credit_balance_exhausted"
        ),
    ),
    "openai-429-monthly_spend_limit_exceeded": quota(
        OA, 429, openai_body("Monthly budget reached.", None, "monthly_spend_limit_exceeded")
    ),
    "openai-429-project_spend_limit_exceeded": quota(
        OA, 429, openai_body("Project budget reached.", None, "project_spend_limit_exceeded")
    ),
    "openai-429-organization_usage_limit_exceeded": quota(
        OA, 429, openai_body("Usage limit reached.", None, "organization_usage_limit_exceeded")
    ),
    "openai-400-context_length_exceeded": Row(
        OA,
        400,
        openai_body(
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130512 tokens. Please reduce the length of the messages.",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        ),
        ErrorKind.CONTEXT_LENGTH,
        False,
        False,
        400,
        "invalid_request_error",
        "context_length_exceeded",
        param="messages",
    ),
    "openai-500-server_error": server(
        OA,
        500,
        openai_body(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
        ),
    ),
    "openai-503-model-overloaded": overloaded(
        OA,
        503,
        openai_body(
            "That model is currently overloaded with other requests. You can retry your "
            "request, or contact us through our help center at help.openai.com if the error "
            "persists.",
            "server_error",
        ),
    ),
    "openai-503-server_is_overloaded": overloaded(
        OA,
        503,
        openai_body("Service unavailable.", "service_unavailable_error", "server_is_overloaded"),
    ),
    "openai-404-model_not_found": Row(
        OA,
        404,
        openai_body(
            "The model `gpt-5-mega` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
        ErrorKind.NOT_FOUND,
        False,
        True,
        404,
        "invalid_request_error",
        "model_not_found",
    ),
    "openai-400-invalid_value": invalid(
        OA,
        400,
        openai_body(
            "Invalid value for 'temperature': must be <= 2.",
            "invalid_request_error",
            "invalid_value",
            "temperature",
        ),
        "invalid_value",
        param="temperature",
    ),
    "openai-403-unsupported_country": auth(
        OA,
        403,
        openai_body(
            "Country, region, or territory not supported",
            "request_forbidden",
            "unsupported_country_region_territory",
        ),
    ),
    # --- DashScope ---
    "dashscope-401-invalid_api_key": auth(
        DS,
        401,
        {
            **openai_body(
                "Incorrect API key provided. ", "invalid_request_error", "invalid_api_key"
            ),
            "request_id": "3f1b7e52-0d0c-9a1e-8f56-5a1c0b8d2e11",
        },
    ),
    "dashscope-native-401-InvalidApiKey": auth(
        DS,
        401,
        {
            "code": "InvalidApiKey",
            "message": "Invalid API-key provided.",
            "request_id": "fb53c4ec-1c12-4fc4-a580-cdb7c3261fc1",
        },
    ),
    "dashscope-429-rate_limit_error": rate_limited(
        DS,
        {
            **openai_body(
                "Too many requests in route. Please try again later.",
                "rate_limit_error",
                "rate_limit_error",
            ),
            "request_id": "2e4a",
        },
    ),
    "dashscope-native-429-Throttling.RateQuota": rate_limited(
        DS,
        {
            "code": "Throttling.RateQuota",
            "message": "Requests rate limit exceeded, please try again later.",
            "request_id": "r1",
        },
    ),
    "dashscope-429-Throttling.BurstRate": rate_limited(
        DS,
        openai_body(
            "Request rate increased too quickly. To ensure system stability, please adjust your "
            "client logic to scale requests more smoothly over time.",
            "Throttling.BurstRate",
            "Throttling.BurstRate",
        ),
    ),
    "dashscope-429-Throttling.Concurrency": rate_limited(
        DS,
        openai_body("Too many concurrent requests.", "Throttling.Concurrency", "Throttling"),
    ),
    "dashscope-429-rate-message-only": rate_limited(
        DS, {"message": "Requests rate limit exceeded, please try again later."}
    ),
    "dashscope-429-insufficient_quota-token-limit": rate_limited(
        DS,
        {
            **openai_body(DASHSCOPE_TPM_MSG, "insufficient_quota", "insufficient_quota"),
            "request_id": "r2",
        },
    ),
    # the link is the evidence even under a mis-configured dialect
    "dashscope-as-openai-429-insufficient_quota-token-limit": rate_limited(
        OA, openai_body(DASHSCOPE_TPM_MSG, "insufficient_quota", "insufficient_quota")
    ),
    # the DashScope dialect breaks the tie when the link is missing
    "dashscope-429-insufficient_quota-no-link": rate_limited(
        DS,
        openai_body("You exceeded your current quota.", "insufficient_quota", "insufficient_quota"),
    ),
    "dashscope-429-free-quota-exceeded": quota(
        DS,
        429,
        openai_body(
            "Free allocated quota exceeded.", "AllocationQuota.FreeTierOnly", "insufficient_quota"
        ),
    ),
    "dashscope-native-429-free-quota-exceeded": quota(
        DS,
        429,
        {"code": "AllocationQuota.FreeTierOnly", "message": "Free allocated quota exceeded."},
    ),
    "dashscope-400-Arrearage": quota(
        DS,
        400,
        {
            **openai_body(
                "Access denied, please make sure your account is in good standing.",
                "Arrearage",
                "Arrearage",
            ),
            "request_id": "r3",
        },
    ),
    "dashscope-400-data_inspection_failed": Row(
        DS,
        400,
        openai_body(
            "Input data may contain inappropriate content.",
            "data_inspection_failed",
            "data_inspection_failed",
        ),
        ErrorKind.MODERATION,
        False,
        False,
        400,
        "invalid_request_error",
        "data_inspection_failed",
    ),
    "dashscope-native-400-DataInspectionFailed": Row(
        DS,
        400,
        {
            "code": "DataInspectionFailed",
            "message": "Input data may contain inappropriate content.",
        },
        ErrorKind.MODERATION,
        False,
        False,
        400,
        "invalid_request_error",
        "data_inspection_failed",
    ),
    "dashscope-400-input-length": Row(
        DS,
        400,
        {"code": "InvalidParameter", "message": "Range of input length should be [1, 30720]"},
        ErrorKind.CONTEXT_LENGTH,
        False,
        False,
        400,
        "invalid_request_error",
        "context_length_exceeded",
    ),
    # --- Anthropic ---
    "anthropic-529-overloaded_error": overloaded(
        AN,
        529,
        anthropic_body("overloaded_error", "Overloaded"),
        headers=(("x-should-retry", "true"),),
    ),
    "anthropic-429-rate_limit_error": rate_limited(
        AN,
        anthropic_body(
            "rate_limit_error",
            "This request would exceed your organization's rate limit of 50,000 input tokens "
            "per minute.",
        ),
        7.0,
        headers=(
            ("retry-after", "7"),
            ("anthropic-ratelimit-input-tokens-reset", "2015-10-21T07:29:00Z"),
        ),
    ),
    "anthropic-429-hint-from-reset-timestamp": rate_limited(
        AN,
        anthropic_body("rate_limit_error", "Number of requests has exceeded your rate limit."),
        10.0,
        headers=(
            ("anthropic-ratelimit-requests-reset", "2015-10-21T07:28:00Z"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2015-10-21T07:29:00Z"),
        ),
    ),
    "anthropic-429-enforced_spend_limit_reached-type": quota(
        AN,
        429,
        anthropic_body("enforced_spend_limit_reached", "You have reached your spend limit."),
    ),
    "anthropic-429-enforced_spend_limit_reached-message": quota(
        AN,
        429,
        anthropic_body(
            "rate_limit_error", "enforced_spend_limit_reached: your organization's spend cap"
        ),
    ),
    "anthropic-402-billing_error": quota(
        AN, 402, anthropic_body("billing_error", "Your credit balance is too low.")
    ),
    "anthropic-401-authentication_error": auth(
        AN, 401, anthropic_body("authentication_error", "invalid x-api-key")
    ),
    "anthropic-413-request_too_large": Row(
        AN,
        413,
        anthropic_body("request_too_large", "Request exceeds the maximum allowed number of bytes."),
        ErrorKind.REQUEST_TOO_LARGE,
        False,
        True,
        413,
        "invalid_request_error",
        "request_too_large",
    ),
    # --- Azure ---
    "azure-429-retry-after-86400": rate_limited(
        AZ,
        {
            "error": {
                "code": "429",
                "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI "
                "API version 2024-02-01 have exceeded token rate limit of your current "
                "AIServices S0 pricing tier. Please retry after 86400 seconds. Please contact "
                "Azure support service if you would like to further increase the default rate "
                "limit.",
            }
        },
        86400.0,
        headers=(("x-ratelimit-reset-requests", "-1"), ("x-ratelimit-reset-tokens", "0")),
    ),
    "azure-400-content_filter": Row(
        AZ,
        400,
        {
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure "
                "OpenAI's content management policy.",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {"hate": {"filtered": True, "severity": "high"}},
                },
            }
        },
        ErrorKind.MODERATION,
        False,
        False,
        400,
        "invalid_request_error",
        "content_filter",
        param="prompt",
    ),
    "azure-404-DeploymentNotFound": Row(
        AZ,
        404,
        {"error": {"code": "DeploymentNotFound", "message": "The API deployment does not exist."}},
        ErrorKind.NOT_FOUND,
        False,
        True,
        404,
        "invalid_request_error",
        "model_not_found",
    ),
    # --- DeepSeek / Moonshot ---
    "deepseek-402-insufficient-balance": quota(
        Dialect.DEEPSEEK,
        402,
        openai_body("Insufficient Balance", "unknown_error", "invalid_request_error"),
    ),
    "moonshot-429-engine_overloaded_error": overloaded(
        Dialect.MOONSHOT,
        429,
        openai_body(
            "The engine is currently overloaded, please try again later", "engine_overloaded_error"
        ),
    ),
    # --- proxies and the rest ---
    "proxy-502-html": server(OA, 502, HTML_502),
    "proxy-504-html": server(OA, 504, HTML_504),
    "503-empty": server(OA, 503, b""),
    "500-invalid-utf8": server(OA, 500, b"\xff\xfe\xfa not utf-8"),
    "520-unknown-5xx": server(OA, 520, b"{}"),
    "409-conflict": server(OA, 409, openai_body("Conflict.")),
    "408-timeout": Row(
        OA,
        408,
        openai_body("Request timed out."),
        ErrorKind.TIMEOUT,
        True,
        True,
        504,
        "timeout_error",
        "upstream_timeout",
    ),
    "422-vllm": invalid(
        Dialect.VLLM,
        422,
        {
            "object": "error",
            "message": "temperature must be >= 0",
            "type": "BadRequestError",
            "code": 422,
        },
        None,
    ),
    "400-vllm-context": Row(
        Dialect.VLLM,
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 5000 tokens.",
            "type": "BadRequestError",
            "code": 400,
        },
        ErrorKind.CONTEXT_LENGTH,
        False,
        False,
        400,
        "invalid_request_error",
        "context_length_exceeded",
    ),
    "418-unknown-4xx": invalid(OA, 418, b"I'm a teapot", None),
    "429-no-body": rate_limited(OA, b"", 3.0, headers=(("Retry-After", "3"),)),
    "404-ollama-string-error": Row(
        Dialect.VLLM,
        404,
        {"error": 'model "llama9" not found, try pulling it first'},
        ErrorKind.NOT_FOUND,
        False,
        True,
        404,
        "invalid_request_error",
        "model_not_found",
    ),
    "301-redirect": Row(
        OA,
        301,
        b"",
        ErrorKind.PROTOCOL,
        False,
        True,
        502,
        "server_error",
        "upstream_protocol_error",
    ),
}


def _body_bytes(body: dict[str, Any] | bytes) -> bytes:
    return body if isinstance(body, bytes) else orjson.dumps(body)


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_faults_table_row(row: Row) -> None:
    err = classify_response(row.dialect, row.status, dict(row.headers), _body_bytes(row.body), NOW)
    assert err.kind is row.kind
    assert err.status == row.status
    assert err.retryable is row.retryable
    assert err.failover is row.failover
    assert err.retry_after == row.retry_after
    assert err.disable_key_for == row.disable_key_for
    assert err.client_status == row.client_status
    body = err.client_body()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["type"] == row.client_type
    assert body["error"]["code"] == row.client_code
    assert body["error"]["param"] == row.param
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert message
    assert "<html" not in message.lower()  # never HTML
    assert orjson.loads(orjson.dumps(body)) == body  # serialisable as-is


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_faults_table_row_accepts_dialect_as_string(row: Row) -> None:
    as_enum = classify_response(
        row.dialect, row.status, dict(row.headers), _body_bytes(row.body), NOW
    )
    as_str = classify_response(
        str(row.dialect), row.status, dict(row.headers), _body_bytes(row.body), NOW
    )
    assert as_str == as_enum


def test_unknown_dialect_is_treated_as_openai() -> None:
    body = orjson.dumps(openai_body(OPENAI_QUOTA_MSG, "insufficient_quota", "insufficient_quota"))
    assert classify_response("my-proxy", 429, {}, body, NOW).kind is ErrorKind.QUOTA


def test_insufficient_quota_depends_on_dialect_only_without_evidence() -> None:
    body = orjson.dumps(
        openai_body("You exceeded your current quota.", "insufficient_quota", "insufficient_quota")
    )
    assert classify_response(Dialect.OPENAI, 429, {}, body, NOW).kind is ErrorKind.QUOTA
    assert classify_response(Dialect.DASHSCOPE, 429, {}, body, NOW).kind is ErrorKind.RATE_LIMIT


# --- messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (502, HTML_502, "upstream returned HTTP 502 with a non-JSON body"),
        (504, HTML_504, "upstream returned HTTP 504 with a non-JSON body"),
        (503, b"", "upstream returned HTTP 503 with an empty body"),
        (503, b"  \r\n", "upstream returned HTTP 503 with an empty body"),
        (500, b"\xff\xfe\xfa", "upstream returned HTTP 500 with a non-JSON body"),
        (
            503,
            b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
            "upstream returned HTTP 503 with a non-JSON body: upstream connect error or "
            "disconnect/reset before headers. reset reason: overflow",
        ),
        (500, b"line one\nline two", "upstream returned HTTP 500 with a non-JSON body"),
        (500, b"x" * 201, "upstream returned HTTP 500 with a non-JSON body"),
        (500, b"{truncated json", "upstream returned HTTP 500 with a non-JSON body"),
        (500, b"{}", "upstream returned HTTP 500"),
        (500, b"[]", "upstream returned HTTP 500 with a JSON body that is not an error"),
        (500, b"null", "upstream returned HTTP 500 with a JSON body that is not an error"),
        (500, b'"oops"', "upstream returned HTTP 500 with a JSON body that is not an error"),
        (500, b'{"error": {"type": "server_error"}}', "upstream returned HTTP 500 (server_error)"),
        (400, b'{"detail": "Not a valid request"}', "Not a valid request"),
        (
            400,
            b'[{"error": {"code": 400, "message": "API key not valid.", "status": "INVALID"}}]',
            "API key not valid.",
        ),
        (500, b'{"error": {"message": "  padded  "}}', "padded"),
    ],
)
def test_message(status: int, body: bytes, message: str) -> None:
    assert classify_response(Dialect.OPENAI, status, {}, body, NOW).message == message


def test_long_message_is_truncated() -> None:
    err = classify_response(Dialect.OPENAI, 400, {}, orjson.dumps(openai_body("x" * 5000)), NOW)
    assert len(err.message) == 1000
    assert err.message.endswith("…")


def test_body_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real_loads = orjson.loads

    def counting_loads(data: bytes) -> Any:
        calls.append(data)
        return real_loads(data)

    monkeypatch.setattr(_classify.orjson, "loads", counting_loads)
    body = orjson.dumps(openai_body("Please try again in 644ms.", "tokens", "rate_limit_exceeded"))
    classify_response(Dialect.OPENAI, 429, {"x-ratelimit-reset-tokens": "1s"}, body, NOW)
    assert calls == [body]


def test_request_id_from_body_then_header() -> None:
    body = {**openai_body("Too many requests in route."), "request_id": "ds-1"}
    headers = {"X-Request-Id": "req_abc"}
    assert classify_response(DS, 429, headers, orjson.dumps(body), NOW).request_id == "ds-1"
    assert classify_response(OA, 429, headers, b"", NOW).request_id == "req_abc"
    assert classify_response(OA, 429, {}, b"", NOW).request_id is None


def test_upstream_code_and_hint_source_are_kept_for_logs() -> None:
    body = orjson.dumps(
        {"code": "Throttling.RateQuota", "message": "Requests rate limit exceeded."}
    )
    err = classify_response(DS, 429, {"retry-after": "2"}, body, NOW)
    assert err.upstream_code == "Throttling.RateQuota"
    assert err.code == "rate_limit_exceeded"
    assert err.retry_after_source == "retry-after"
    azure = orjson.dumps({"error": {"code": "429", "message": "Please retry after 5 seconds."}})
    err = classify_response(AZ, 429, {}, azure, NOW)
    assert (err.upstream_code, err.retry_after, err.retry_after_source) == ("429", 5.0, "message")


# --- x-should-retry and hints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "header", "retryable", "failover"),
    [
        (500, openai_body("boom", "server_error"), "false", False, True),
        (500, openai_body("boom", "server_error"), "FALSE", False, True),
        (429, openai_body("slow down", "requests", "rate_limit_exceeded"), "false", False, True),
        (529, anthropic_body("overloaded_error", "Overloaded"), "true", True, True),
        # overrides the status default ...
        (400, openai_body("try that again", "invalid_request_error"), "true", True, False),
        # ... but never turns a client mistake into failover
        (
            400,
            openai_body("bad", "invalid_request_error", "context_length_exceeded"),
            "true",
            True,
            False,
        ),
        # irrelevant for a bad key or an unpaid bill: benching decides
        (401, openai_body("bad key", code="invalid_api_key"), "true", False, True),
        (429, openai_body(OPENAI_QUOTA_MSG, "insufficient_quota"), "true", False, True),
        # unrecognised values are ignored
        (500, openai_body("boom", "server_error"), "maybe", True, True),
    ],
)
def test_x_should_retry(
    status: int, body: dict[str, Any], header: str, retryable: bool, failover: bool
) -> None:
    err = classify_response(OA, status, {"X-Should-Retry": header}, orjson.dumps(body), NOW)
    assert (err.retryable, err.failover) == (retryable, failover)


def test_no_retry_after_when_not_retryable() -> None:
    body = orjson.dumps(
        openai_body("slow down. Please try again in 2s.", "requests", "rate_limit_exceeded")
    )
    err = classify_response(OA, 429, {"x-should-retry": "false", "retry-after": "2"}, body, NOW)
    assert (err.retryable, err.retry_after) == (False, None)


def test_reset_headers_are_not_a_hint_for_other_errors() -> None:
    # OpenAI sends x-ratelimit-* with every response; on a 500 they mean nothing.
    headers = {"x-ratelimit-reset-requests": "8.64s", "x-ratelimit-reset-tokens": "6m0s"}
    body = orjson.dumps(openai_body("The server had an error", "server_error"))
    assert classify_response(OA, 500, headers, body, NOW).retry_after is None
    # ... but an explicit retry-after on a 503 is honored
    err = classify_response(OA, 503, {**headers, "retry-after": "3"}, b"", NOW)
    assert err.retry_after == 3.0
    # and on a 400 nothing is
    bad = orjson.dumps(openai_body("bad", "invalid_request_error"))
    assert classify_response(OA, 400, {**headers, "retry-after": "3"}, bad, NOW).retry_after is None


def test_rate_limit_dimension_from_message_picks_reset_header() -> None:
    headers = {"x-ratelimit-reset-requests": "20s", "x-ratelimit-reset-tokens": "2s"}
    tpm = orjson.dumps(
        openai_body("Rate limit reached on tokens per min (TPM).", None, "rate_limit_exceeded")
    )
    rpm = orjson.dumps(
        openai_body("Rate limit reached on requests per min (RPM).", None, "rate_limit_exceeded")
    )
    unknown = orjson.dumps(openai_body("Rate limit reached.", None, "rate_limit_exceeded"))
    assert classify_response(OA, 429, headers, tpm, NOW).retry_after == 2.0
    assert classify_response(OA, 429, headers, rpm, NOW).retry_after == 20.0
    assert classify_response(OA, 429, headers, unknown, NOW).retry_after == 20.0  # the larger


def test_retry_after_http_date() -> None:
    err = classify_response(AN, 529, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, b"", NOW)
    assert (err.kind, err.retry_after) == (ErrorKind.OVERLOADED, 10.0)


# --- key scrubbing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        (
            "Incorrect API key provided: sk-abc123…xyz9. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "Incorrect API key provided: sk-***. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
        ),
        (
            "Incorrect API key provided: sk-proj-AbCd****************************wxYZ.",
            "Incorrect API key provided: sk-***.",
        ),
        ("key sk-ant-api03-AbC_dEf-123 rejected", "key sk-*** rejected"),
        ("Incorrect API key provided: abc123def.", "Incorrect API key provided: ***."),
        ("Incorrect API key provided: abc123def", "Incorrect API key provided: ***"),
        ("Authorization: Bearer eyJhbGciOi.J9.abc", "Authorization: Bearer ***"),
        ("GET /v1/models?key=AIzaSyA-123&alt=json", "GET /v1/models?key=***&alt=json"),
        ("azure key 0123456789abcdef0123456789abcdef is invalid", "azure key *** is invalid"),
        # ids that support needs survive
        (
            "request id req_0123456789abcdef0123456789abcdef",
            "request id req_0123456789abcdef0123456789abcdef",
        ),
        (
            "request 3f1b7e52-0d0c-9a1e-8f56-5a1c0b8d2e11 failed",
            "request 3f1b7e52-0d0c-9a1e-8f56-5a1c0b8d2e11 failed",
        ),
        (
            "chatcmpl-0123456789abcdefghijklmnopqrstuvwxyz",
            "chatcmpl-0123456789abcdefghijklmnopqrstuvwxyz",
        ),
        ("task-skill is fine; ask-me too", "task-skill is fine; ask-me too"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_scrub_secrets(text: str, scrubbed: str) -> None:
    assert scrub_secrets(text) == scrubbed


def test_scrubbing_reaches_every_message() -> None:
    key = "sk-live0123456789ABCDEFabcdef0123456789"
    json_body = orjson.dumps(
        openai_body(f"Incorrect API key provided: {key}.", code="invalid_api_key")
    )
    text_body = f"denied for {key}".encode()
    for err in (
        classify_response(OA, 401, {}, json_body, NOW),
        classify_response(OA, 503, {}, text_body, NOW),
        classify_stream_error(OA, {"error": {"message": f"bad key {key}", "type": "server_error"}}),
        transport_error(ErrorKind.CONNECTION, f"proxy said no to Bearer {key}"),
    ):
        assert key not in err.message
        assert key not in str(err.client_body())
        assert "0123456789ABCDEF" not in err.message


# --- the client-facing verdict --------------------------------------------------------------------


def _err(kind: ErrorKind, retry_after: float | None = None) -> UpstreamError:
    return UpstreamError(kind=kind, message="m", retry_after=retry_after)


@pytest.mark.parametrize(
    ("kind", "status", "should_retry"),
    [
        (ErrorKind.RATE_LIMIT, 429, True),
        (ErrorKind.OVERLOADED, 503, True),
        (ErrorKind.QUOTA, 502, False),
        (ErrorKind.AUTH, 502, False),
        (ErrorKind.REQUEST_TOO_LARGE, 413, False),
        (ErrorKind.INVALID_REQUEST, 400, False),
        (ErrorKind.CONTEXT_LENGTH, 400, False),
        (ErrorKind.MODERATION, 400, False),
        (ErrorKind.NOT_FOUND, 404, False),
        (ErrorKind.SERVER, 502, True),
        (ErrorKind.CONNECTION, 502, True),
        (ErrorKind.PROTOCOL, 502, True),
        (ErrorKind.TIMEOUT, 504, True),
    ],
)
def test_client_status_table(kind: ErrorKind, status: int, should_retry: bool) -> None:
    err = _err(kind)
    assert err.client_status == status
    assert err.client_should_retry is should_retry
    assert err.client_headers() == {"x-should-retry": "true" if should_retry else "false"}


def test_every_kind_has_a_client_verdict() -> None:
    for kind in ErrorKind:
        assert _err(kind).client_body()["error"]["type"]


@pytest.mark.parametrize(
    ("retry_after", "headers"),
    [
        (0.644, {"x-should-retry": "true", "retry-after": "1"}),
        (0.0, {"x-should-retry": "true", "retry-after": "0"}),
        (60.0, {"x-should-retry": "true", "retry-after": "60"}),
        # longer than SDKs honor: they would retry at once, so tell them not to
        (86400.0, {"x-should-retry": "false"}),
    ],
)
def test_client_headers_with_retry_after(retry_after: float, headers: dict[str, str]) -> None:
    assert _err(ErrorKind.RATE_LIMIT, retry_after).client_headers() == headers


def test_client_body_auth_and_quota_say_whose_account_failed() -> None:
    auth_body = orjson.dumps(
        openai_body("Incorrect API key provided: sk-abc.", code="invalid_api_key")
    )
    auth_err = classify_response(OA, 401, {}, auth_body, NOW)
    assert auth_err.code == "invalid_api_key"  # for the attempt loop and logs
    assert auth_err.client_body() == {
        "error": {
            "message": "the upstream provider rejected keel's credentials: "
            "Incorrect API key provided: sk-***.",
            "type": "upstream_auth_error",
            "param": None,
            "code": "upstream_auth_error",
        }
    }
    quota_err = classify_response(
        DS, 402, {}, orjson.dumps(openai_body("Insufficient Balance")), NOW
    )
    assert quota_err.client_body() == {
        "error": {
            "message": "keel's upstream account is out of quota or credit: Insufficient Balance",
            "type": "upstream_quota_error",
            "param": None,
            "code": "insufficient_quota",
        }
    }


def test_client_body_context_length_exact() -> None:
    body = openai_body("too long", "invalid_request_error", "context_length_exceeded", "messages")
    err = classify_response(OA, 400, {}, orjson.dumps(body), NOW)
    assert err.client_body() == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


# --- transport failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "client_status", "client_type", "code"),
    [
        (ErrorKind.CONNECTION, 502, "server_error", "upstream_connection_error"),
        (ErrorKind.TIMEOUT, 504, "timeout_error", "upstream_timeout"),
        (ErrorKind.PROTOCOL, 502, "server_error", "upstream_protocol_error"),
    ],
)
def test_transport_error(kind: ErrorKind, client_status: int, client_type: str, code: str) -> None:
    err = transport_error(kind, "peer closed connection without sending complete message body")
    assert (err.kind, err.status, err.retryable, err.failover) == (kind, 0, True, True)
    assert (err.retry_after, err.disable_key_for) == (None, None)
    assert err.client_status == client_status
    assert err.client_body() == {
        "error": {
            "message": "peer closed connection without sending complete message body",
            "type": client_type,
            "param": None,
            "code": code,
        }
    }
    assert err.client_should_retry is True


# --- mid-stream error frames (faults.md §2) -------------------------------------------------------


@dataclass(frozen=True)
class StreamRow:
    dialect: Dialect
    payload: dict[str, Any]
    kind: ErrorKind
    retryable: bool
    failover: bool
    code: str | None
    output_filter: bool = False
    retry_after: float | None = None


STREAM_ROWS: dict[str, StreamRow] = {
    "openai-server_error": StreamRow(
        OA,
        openai_body(
            "The server experienced an error while processing your request. Sorry about that!",
            "server_error",
        ),
        ErrorKind.SERVER,
        True,
        True,
        "upstream_server_error",
    ),
    "dashscope-output-moderation": StreamRow(
        DS,
        openai_body(
            "Output data may contain inappropriate content.",
            "data_inspection_failed",
            "data_inspection_failed",
        ),
        ErrorKind.MODERATION,
        False,
        False,
        "data_inspection_failed",
        output_filter=True,
    ),
    "dashscope-input-moderation-in-stream": StreamRow(
        DS,
        openai_body(
            "Input data may contain inappropriate content.",
            "data_inspection_failed",
            "data_inspection_failed",
        ),
        ErrorKind.MODERATION,
        False,
        False,
        "data_inspection_failed",
    ),
    "azure-content_filter": StreamRow(
        AZ,
        {"error": {"message": "filtered", "code": "content_filter"}},
        ErrorKind.MODERATION,
        False,
        False,
        "content_filter",
        output_filter=True,
    ),
    "anthropic-overloaded": StreamRow(
        AN,
        anthropic_body("overloaded_error", "Overloaded"),
        ErrorKind.OVERLOADED,
        True,
        True,
        "server_is_overloaded",
    ),
    "anthropic-api_error": StreamRow(
        AN,
        anthropic_body("api_error", "Internal server error"),
        ErrorKind.SERVER,
        True,
        True,
        "upstream_server_error",
    ),
    "openai-rate-limit": StreamRow(
        OA,
        openai_body(
            "Rate limit reached. Please try again in 1.5s.", "tokens", "rate_limit_exceeded"
        ),
        ErrorKind.RATE_LIMIT,
        True,
        True,
        "rate_limit_exceeded",
        retry_after=1.5,
    ),
    "azure-code-429": StreamRow(
        AZ,
        {"error": {"code": "429", "message": "Please retry after 20 seconds."}},
        ErrorKind.RATE_LIMIT,
        True,
        True,
        "rate_limit_exceeded",
        retry_after=20.0,
    ),
    "vllm-numeric-400": StreamRow(
        Dialect.VLLM,
        {"error": {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}},
        ErrorKind.INVALID_REQUEST,
        False,
        False,
        None,
    ),
    "string-error": StreamRow(
        OA, {"error": "boom"}, ErrorKind.SERVER, True, True, "upstream_server_error"
    ),
    "empty-error": StreamRow(
        OA, {"error": {}}, ErrorKind.SERVER, True, True, "upstream_server_error"
    ),
}


@pytest.mark.parametrize("row", STREAM_ROWS.values(), ids=STREAM_ROWS.keys())
def test_stream_error(row: StreamRow) -> None:
    err = classify_stream_error(row.dialect, row.payload)
    assert err.kind is row.kind
    assert err.status == 200
    assert (err.retryable, err.failover) == (row.retryable, row.failover)
    assert err.code == row.code
    assert err.output_filter is row.output_filter
    assert err.retry_after == row.retry_after
    assert err.disable_key_for is None
    assert err.message


@pytest.mark.parametrize(
    ("message", "output_filter"),
    [
        ("Output data may contain inappropriate content.", True),
        ("Input data may contain inappropriate content.", False),
    ],
)
def test_non_stream_output_moderation(message: str, output_filter: bool) -> None:
    body = openai_body(message, "data_inspection_failed", "data_inspection_failed")
    err = classify_response(DS, 400, {}, orjson.dumps(body), NOW)
    assert (err.kind, err.output_filter) == (ErrorKind.MODERATION, output_filter)


def test_stream_error_without_message() -> None:
    err = classify_stream_error(OA, {"error": {"type": "server_error"}})
    assert err.message == "upstream sent an error frame inside the stream"


# --- robustness -----------------------------------------------------------------------------------


@given(
    status=st.integers(min_value=100, max_value=599),
    body=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["error", "code", "message", "type", "detail", "request_id"]),
            st.one_of(
                st.none(),
                st.integers(-(2**63), 2**63 - 1),
                st.text(max_size=40),
                st.dictionaries(
                    st.sampled_from(["message", "type", "code", "param", "innererror"]),
                    st.one_of(st.none(), st.integers(0, 1000), st.text(max_size=40)),
                ),
            ),
        ).map(orjson.dumps),
    ),
    dialect=st.sampled_from(list(Dialect)),
)
def test_classify_response_never_raises(status: int, body: bytes, dialect: Dialect) -> None:
    err = classify_response(dialect, status, {}, body, NOW)
    assert isinstance(err.kind, ErrorKind)
    assert err.message
    assert err.client_body()["error"]["type"]
    if 400 <= status < 500 and err.kind is ErrorKind.INVALID_REQUEST:
        assert (err.retryable, err.failover) == (False, False)
    if status >= 500 and status != 529:
        assert err.retryable or err.kind in (
            ErrorKind.QUOTA,
            ErrorKind.AUTH,
            ErrorKind.MODERATION,
            ErrorKind.CONTEXT_LENGTH,
            ErrorKind.REQUEST_TOO_LARGE,
            ErrorKind.NOT_FOUND,
        )


@given(
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none() | st.text(max_size=20) | st.integers(),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
            max_leaves=10,
        ),
    )
)
def test_classify_stream_error_never_raises(payload: dict[str, Any]) -> None:
    err = classify_stream_error(Dialect.OPENAI, payload)
    assert err.message


# --- the simulator's faults classify as faults.md says ------------------------------------------

SIM_FAULTS: dict[tuple[str, str], tuple[ErrorKind, bool, bool]] = {
    # (fault, sim dialect): (kind, retryable, failover)
    ("r429", "openai"): (ErrorKind.RATE_LIMIT, True, True),
    ("r429", "dashscope"): (ErrorKind.RATE_LIMIT, True, True),
    ("r429", "anthropic"): (ErrorKind.RATE_LIMIT, True, True),
    ("r429", "azure"): (ErrorKind.RATE_LIMIT, True, True),
    ("r429_long", "azure"): (ErrorKind.RATE_LIMIT, True, True),
    ("concurrency", "openai"): (ErrorKind.RATE_LIMIT, True, True),
    ("quota", "openai"): (ErrorKind.QUOTA, False, True),
    ("quota_ds", "dashscope"): (ErrorKind.RATE_LIMIT, True, True),
    ("free_quota_ds", "dashscope"): (ErrorKind.QUOTA, False, True),
    ("too_large", "openai"): (ErrorKind.REQUEST_TOO_LARGE, False, True),
    ("auth", "openai"): (ErrorKind.AUTH, False, True),
    ("auth", "dashscope"): (ErrorKind.AUTH, False, True),
    ("auth", "anthropic"): (ErrorKind.AUTH, False, True),
    ("arrearage", "dashscope"): (ErrorKind.QUOTA, False, True),
    ("balance", "deepseek"): (ErrorKind.QUOTA, False, True),
    ("ctx", "openai"): (ErrorKind.CONTEXT_LENGTH, False, False),
    ("inspect", "dashscope"): (ErrorKind.MODERATION, False, False),
    ("content_filter_az", "azure"): (ErrorKind.MODERATION, False, False),
    ("e500", "openai"): (ErrorKind.SERVER, True, True),
    ("e500", "anthropic"): (ErrorKind.SERVER, True, True),
    ("e503", "openai"): (ErrorKind.OVERLOADED, True, True),
    ("e503", "anthropic"): (ErrorKind.OVERLOADED, True, True),
    ("e529", "anthropic"): (ErrorKind.OVERLOADED, True, True),
    ("e502_html", "openai"): (ErrorKind.SERVER, True, True),
    ("e504_html", "openai"): (ErrorKind.SERVER, True, True),
    ("moonshot", "moonshot"): (ErrorKind.OVERLOADED, True, True),
}


@pytest.mark.parametrize(("fault", "dialect"), SIM_FAULTS.keys(), ids=map(str, SIM_FAULTS))
def test_simulator_faults(fault: str, dialect: str) -> None:
    sim_errors = pytest.importorskip("keel.sim._errors")
    key = "sk-simkey0123456789abcdefXYZ"
    reply = sim_errors.error_reply(fault, None, dialect, api_key=key, model="m", request_id="rid-1")
    err = classify_response(dialect, reply.status, reply.headers, reply.body, NOW)
    assert (err.kind, err.retryable, err.failover) == SIM_FAULTS[fault, dialect]
    assert key[3:] not in err.message
    assert err.message


@pytest.mark.parametrize(
    ("payload_fn", "dialect", "kind", "output_filter"),
    [
        ("err_mid_payload", "openai", ErrorKind.SERVER, False),
        ("inspect_mid_payload", "dashscope", ErrorKind.MODERATION, True),
        ("anth_err_payload", "anthropic", ErrorKind.OVERLOADED, False),
    ],
)
def test_simulator_mid_stream_frames(
    payload_fn: str, dialect: str, kind: ErrorKind, output_filter: bool
) -> None:
    sim_errors = pytest.importorskip("keel.sim._errors")
    fn = getattr(sim_errors, payload_fn)
    args = {"err_mid_payload": (), "inspect_mid_payload": ("c1", "r1"), "anth_err_payload": ("r1",)}
    err = classify_stream_error(dialect, orjson.loads(fn(*args[payload_fn])))
    assert (err.kind, err.output_filter) == (kind, output_filter)
