"""Error replies as real providers send them (shared/faults.md §1) and mid-stream error frames
(§2). Pure: (fault, dialect, context) -> status, headers, body bytes.

Bodies are copied from what the providers were seen to send, abridged where the text does not
matter. Explicit names (``r429_ds``, ``quota_ds``, ``e529``…) always give the same shape; a few
generic names (``r429``, ``auth``, ``e500``, ``e503``) follow the simulator's ``--dialect``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

_JSON = "application/json"
_HTML = "text/html"

_HTML_PAGES = {
    502: "502 Bad Gateway",
    504: "504 Gateway Time-out",
}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = _JSON


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String``: ``20ms``, ``1.5s``, ``6m0s``, ``24h0m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    sec = f"{round(s, 3):g}s"
    if h:
        return f"{int(h)}h{int(m)}m{sec}"
    return f"{int(m)}m{sec}" if m else sec


def _seconds_header(seconds: float) -> str:
    # Integer when whole; otherwise a decimal (the openai SDK parses floats). retry-after-ms is
    # always sent alongside, which is what careful clients read first.
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"


def mask_key(key: str) -> str:
    """OpenAI-style masking (``sk-ab***************wxyz``); short keys are masked entirely."""
    if len(key) <= 10:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


@lru_cache(maxsize=1024)  # a handful of keys, thousands of requests per second
def key_fingerprint(key: str | None) -> str | None:
    """What the request log stores instead of an API key."""
    if not key:
        return None
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _openai(message: str, type_: str | None, code: str | None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _anthropic(type_: str, message: str, request_id: str) -> Any:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}


def _rate_headers(hint: float) -> dict[str, str]:
    d = go_duration(hint)
    return {
        "retry-after": _seconds_header(hint),
        "retry-after-ms": _seconds_header(round(hint * 1000, 3)),
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-remaining-tokens": "149000",
        "x-ratelimit-reset-requests": d,
        "x-ratelimit-reset-tokens": d,
    }


# Dialect-dependent spellings of generic fault names.
_DIALECT_ALIASES = {
    ("dashscope", "r429"): "r429_ds",
    ("anthropic", "r429"): "r429_anth",
    ("anthropic", "auth"): "auth_anth",
    ("anthropic", "e500"): "e500_anth",
    ("anthropic", "e503"): "e529",
    ("azure", "r429"): "r429_az",
    ("deepseek", "quota"): "balance",  # DeepSeek's "out of money" is 402 Insufficient Balance
    ("moonshot", "e503"): "moonshot",  # Moonshot reports overload as 429 engine_overloaded
}


def error_reply(
    name: str,
    value: float | None,
    dialect: str,
    *,
    api_key: str | None,
    model: str,
    request_id: str,
) -> ErrorReply:
    """The HTTP error for fault ``name`` (``value`` is its parameter, e.g. the r429 hint)."""
    name = _DIALECT_ALIASES.get((dialect, name), name)
    headers: dict[str, str] = {}
    ds = False  # DashScope adds a top-level request_id to its bodies
    status: int
    body: Any
    if name == "r429":
        hint = value if value is not None else 0.02
        status, headers = 429, _rate_headers(hint)
        body = _openai(
            f"Rate limit reached for {model} in organization org-sim on requests per min (RPM): "
            f"Limit 60, Used 60, Requested 1. Please try again in {go_duration(hint)}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more.",
            "requests",
            "rate_limit_exceeded",
        )
    elif name == "r429_az" or name == "r429_long":
        hint = value if value is not None else (86400.0 if name == "r429_long" else 0.02)
        whole = max(1, math.ceil(hint))
        status = 429
        headers = {"retry-after": str(whole), "retry-after-ms": _seconds_header(hint * 1000)}
        if name == "r429_long":
            headers = {"retry-after": str(whole)}
        # Azure: code is the *string* "429" and there is no type.
        body = {
            "error": {
                "code": "429",
                "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI "
                "API version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 "
                f"pricing tier. Please retry after {whole} second{'s' if whole != 1 else ''}. "
                "Please go here: https://aka.ms/oai/quotaincrease if you would like to further "
                "increase the default rate limit.",
            }
        }
    elif name == "r429_anth":
        hint = value if value is not None else 0.02
        status, headers = 429, {"retry-after": _seconds_header(hint)}
        body = _anthropic(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization. "
            "Please try again later.",
            request_id,
        )
    elif name == "r429_ds":
        status, ds = 429, True
        body = _openai(
            "Too many requests in route. Please try again later.",
            "rate_limit_error",
            "rate_limit_error",
        )
    elif name == "quota":
        status = 429
        body = _openai(
            "You exceeded your current quota, please check your plan and billing details. For "
            "more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            "insufficient_quota",
        )
    elif name == "quota_ds":
        # Despite the name, on DashScope this is a TPM limit and worth retrying.
        status, ds = 429, True
        body = _openai(
            "You exceeded your current quota, please check your plan and billing details. For "
            "details, see: https://help.aliyun.com/zh/model-studio/error-code#token-limit",
            "insufficient_quota",
            "insufficient_quota",
        )
    elif name == "free_quota_ds":
        status, ds = 429, True
        body = _openai(
            "Free allocated quota exceeded.",
            "Throttling.AllocationQuota",
            "Throttling.AllocationQuota",
        )
    elif name == "too_large":
        status = 429
        body = _openai(
            f"Request too large for {model} in organization org-sim on tokens per min (TPM): "
            "Limit 30000, Requested 45000. The input or output tokens must be reduced in order "
            "to run successfully. Visit https://platform.openai.com/account/rate-limits to "
            "learn more.",
            "tokens",
            "rate_limit_exceeded",
        )
    elif name == "auth":
        status = 401
        masked = mask_key(api_key or "")
        if dialect == "dashscope":
            ds = True
            body = _openai(
                "Incorrect API key provided. ", "invalid_request_error", "invalid_api_key"
            )
        else:
            body = _openai(
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
    elif name == "auth_anth":
        status, body = 401, _anthropic("authentication_error", "invalid x-api-key", request_id)
    elif name == "arrearage":
        status, ds = 400, True
        body = _openai(
            "Access denied, please make sure your account is in good standing. For details, "
            "see: https://help.aliyun.com/zh/model-studio/error-code#overdue-payment",
            "Arrearage",
            "Arrearage",
        )
    elif name == "balance":
        status = 402
        body = _openai("Insufficient Balance", "unknown_error", "invalid_request_error")
    elif name == "ctx":
        status = 400
        body = _openai(
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130000 tokens. Please reduce the length of the messages.",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        )
    elif name == "inspect":
        status, ds = 400, True
        body = _openai(
            "Input data may contain inappropriate content.",
            "data_inspection_failed",
            "data_inspection_failed",
        )
    elif name == "content_filter_az":
        status = 400
        filtered = {"filtered": True, "severity": "high"}
        safe = {"filtered": False, "severity": "safe"}
        body = {
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure "
                "OpenAI's content management policy. Please modify your prompt and retry. To "
                "learn more about our content filtering policies please read our documentation: "
                "https://go.microsoft.com/fwlink/?linkid=2198766",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {
                        "hate": filtered,
                        "self_harm": safe,
                        "sexual": safe,
                        "violence": safe,
                    },
                },
            }
        }
    elif name == "e500":
        status = 500
        body = _openai(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )
    elif name == "e500_anth":
        status, body = 500, _anthropic("api_error", "Internal server error", request_id)
    elif name == "e503":
        status = 503
        body = _openai(
            "That model is currently overloaded with other requests. You can retry your "
            "request, or contact us through our help center at help.openai.com if the error "
            "persists.",
            "server_error",
            "server_is_overloaded",
        )
    elif name == "e529":
        status, headers = 529, {"x-should-retry": "true"}
        body = _anthropic("overloaded_error", "Overloaded", request_id)
    elif name in ("e502_html", "e504_html"):
        status = 502 if name == "e502_html" else 504
        title = _HTML_PAGES[status]
        page = (
            f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
            f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n"
        )
        return ErrorReply(status, page.encode(), {}, _HTML)
    elif name == "moonshot":
        status = 429
        body = {
            "error": {
                "message": "The engine is currently overloaded, please try again later",
                "type": "engine_overloaded_error",
            }
        }
    elif name == "window":  # --rate-limit exceeded: the hint is the time to the next window
        hint = value if value is not None else 1.0
        status, headers = 429, _rate_headers(hint)
        body = _openai(
            f"Rate limit reached for {model} on requests per window. "
            f"Please try again in {go_duration(hint)}.",
            "requests",
            "rate_limit_exceeded",
        )
    elif name == "concurrency":  # --max-concurrency exceeded
        hint = value if value is not None else 0.02
        status, headers = 429, _rate_headers(hint)
        body = _openai(
            f"Too many concurrent requests. Please try again in {go_duration(hint)}.",
            "requests",
            "rate_limit_exceeded",
        )
    else:
        raise ValueError(f"not an error fault: {name}")
    if (ds or dialect == "dashscope") and "error" in body and "type" in body["error"]:
        body["request_id"] = request_id
    return ErrorReply(status, orjson.dumps(body), headers)


def bad_request(message: str) -> ErrorReply:
    return ErrorReply(
        400, orjson.dumps(_openai(message, "invalid_request_error", None, "messages"))
    )


# -- mid-stream error frames (the payload of one ``data:`` line) -----------------------------


def err_mid_payload() -> bytes:
    return orjson.dumps(
        _openai(
            "The server experienced an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )
    )


def inspect_mid_payload(chunk_id: str, request_id: str) -> bytes:
    body = _openai(
        "Output data may contain inappropriate content.",
        "data_inspection_failed",
        "data_inspection_failed",
    )
    body["id"], body["request_id"] = chunk_id, request_id
    return orjson.dumps(body)


def anth_err_payload(request_id: str) -> bytes:
    return orjson.dumps(_anthropic("overloaded_error", "Overloaded", request_id))


def non_stream_mid_error(name: str, chunk_id: str, request_id: str) -> ErrorReply:
    """What a mid-stream error fault becomes on a non-stream request."""
    if name == "inspect_mid":
        return ErrorReply(400, inspect_mid_payload(chunk_id, request_id))
    if name == "anth_err_mid":
        return ErrorReply(529, anth_err_payload(request_id), {"x-should-retry": "true"})
    return ErrorReply(500, err_mid_payload())


# -- the walls' refusals (--max-concurrency, --rate-limit) -------------------------------------

#: How a wall's 429 reads. ``default``: the simulator's own explicit wording (the concurrency
#: wall says "concurrent", the rate wall "per window"), with hints; the others are what real
#: upstreams send, none of which says *which* limit was hit:
#: ``openai`` "Rate limit reached for requests" with retry-after (and x-ratelimit-* headers);
#: ``dashscope`` "Too many requests in route. Please try again later." - no hint, no headers;
#: ``bare`` a proxy's text/plain ``429 Too Many Requests`` - no hint, no JSON.
WALL_WORDINGS = ("default", "openai", "dashscope", "bare")
#: The retry-after OpenAI's wording carries on a concurrency refusal: a concurrency wall knows
#: no exact time, so a provider states a round figure.
CONCURRENCY_HINT = 0.5


def wall_reply(wall: str, wording: str, hint: float, *, model: str, request_id: str) -> ErrorReply:
    """The 429 of a wall (``"concurrency"`` or ``"window"``) in ``wording``. ``hint``: the
    exact seconds until the window admits another request (the rate wall), or the default
    wording's short hint (the concurrency wall)."""
    if wording == "default":
        return error_reply(wall, hint, "openai", api_key=None, model=model, request_id=request_id)
    if wording == "openai":
        if wall == "concurrency":
            hint = CONCURRENCY_HINT
        body = _openai(
            f"Rate limit reached for requests on {model} in organization org-sim. "
            f"Please try again in {go_duration(hint)}.",
            "requests",
            "rate_limit_exceeded",
        )
        headers = {"retry-after": _seconds_header(round(hint, 3)),
                   "retry-after-ms": _seconds_header(round(hint * 1000, 3))}  # fmt: skip
        return ErrorReply(429, orjson.dumps(body), headers)
    if wording == "dashscope":
        body = _openai(
            "Too many requests in route. Please try again later.",
            "rate_limit_error",
            "rate_limit_error",
        )
        body["request_id"] = request_id
        return ErrorReply(429, orjson.dumps(body))
    if wording == "bare":
        return ErrorReply(429, b"429 Too Many Requests\n", {}, "text/plain")
    raise ValueError(f"unknown wall wording {wording!r}; expected one of {WALL_WORDINGS}")
