"""Upstream error classification: (dialect, status, headers, body) -> a typed verdict.

Pure and I/O-free. Every row of shared/faults.md §1 and the mid-stream error frames of §2 map
to exactly one ``UpstreamError`` whose flags tell the plan (``keel._plan``) what to do:

* ``retryable``  - the *same* deployment may succeed if asked again (after ``retry_after``).
* ``failover``   - *another* deployment could succeed (false for client mistakes that fail
                   anywhere: invalid request, context length, input moderation).
* ``disable_key_for`` - seconds to take this deployment's key out of rotation (auth, billing).

Classification reads the body first and the status second, and barely looks at the dialect:
providers copy each other's error shapes and deployments are often configured with the wrong
dialect (a DashScope endpoint as ``openai``), so the error's own words are the better evidence.
The dialect only breaks one tie (DashScope's retryable ``insufficient_quota``).

What keel shows its client when an error is final (``client_status`` / ``client_body``):

=================  ======  ======================  ===========================  ============
kind               status  type                    code                         x-should-retry
=================  ======  ======================  ===========================  ============
RATE_LIMIT         429     rate_limit_error        rate_limit_exceeded          true [1]
OVERLOADED         503     server_error            server_is_overloaded         true
QUOTA              502     upstream_quota_error    insufficient_quota           false
AUTH               502     upstream_auth_error     upstream_auth_error [2]      false
REQUEST_TOO_LARGE  413     invalid_request_error   request_too_large            false
INVALID_REQUEST    400     invalid_request_error   upstream's code, if any      false
CONTEXT_LENGTH     400     invalid_request_error   context_length_exceeded      false
MODERATION         400     invalid_request_error   content_filter |             false
                                                   data_inspection_failed
NOT_FOUND          404     invalid_request_error   model_not_found              false
SERVER             502     server_error            upstream_server_error        true
CONNECTION         502     server_error            upstream_connection_error    true
PROTOCOL           502     server_error            upstream_protocol_error      true
TIMEOUT            504     timeout_error           upstream_timeout             true
=================  ======  ======================  ===========================  ============

Why 502 for QUOTA and AUTH: the client's request was fine; keel's own upstream account failed
(bad key, unpaid bill). That is a bad gateway, not a client error. A 401 would tell the client
*its* key is wrong, and a 429 makes every SDK and retry library hammer keel. ``param`` is
passed through; the upstream's own code stays in ``upstream_code`` for logs.

[1] false when ``retry_after`` exceeds 60 s: the openai SDK caps retry-after at 60 s and would
    otherwise retry within a second of a 24-hour wait (Azure "retry after 86400 seconds").
[2] not ``invalid_api_key``, which keel's own front door uses for the *client's* key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from keel._hints import lower_headers, retry_after_hint_with_source

__all__ = [
    "AUTH_DISABLE_SECONDS",
    "QUOTA_DISABLE_SECONDS",
    "Dialect",
    "ErrorKind",
    "UpstreamError",
    "classify_response",
    "classify_stream_error",
    "scrub_secrets",
    "transport_error",
]

# Auth errors are fixed by an operator (new key, right region); benching for minutes stops
# keel from hammering a dead key while letting a fixed key back in without a restart.
AUTH_DISABLE_SECONDS = 300.0
# Billing is fixed by a human paying a bill: bench for an hour.
QUOTA_DISABLE_SECONDS = 3600.0
# The openai SDK honors retry-after only up to 60 s (faults.md §1, last paragraph).
CLIENT_RETRY_AFTER_CAP = 60.0
# Upstream messages are for humans; a multi-kilobyte one is a bug page or an echoed prompt.
MAX_MESSAGE_CHARS = 1000


class Dialect(StrEnum):
    OPENAI = "openai"
    DASHSCOPE = "dashscope"
    AZURE = "azure"
    ANTHROPIC = "anthropic"  # OpenAI-compatible endpoint that may emit Anthropic-style errors
    DEEPSEEK = "deepseek"
    MOONSHOT = "moonshot"
    VLLM = "vllm"


class ErrorKind(StrEnum):
    RATE_LIMIT = "rate_limit"  # RPM/TPM/concurrency throttling: retry after the hint
    REQUEST_TOO_LARGE = "request_too_large"  # request > TPM limit: fails on same-limit deployments
    QUOTA = "quota"  # billing / spend cap / free tier spent: bench the key, fail over
    AUTH = "auth"  # bad key / wrong region: bench the key, fail over
    INVALID_REQUEST = "invalid_request"  # client mistake: fails anywhere
    NOT_FOUND = "not_found"  # unknown model on this deployment: fail over
    CONTEXT_LENGTH = "context_length"  # prompt too long: fails anywhere with the same context
    MODERATION = "moderation"  # input (or output, mid-stream) content filter
    OVERLOADED = "overloaded"  # provider overloaded: retry
    SERVER = "server"  # 5xx / HTML from a proxy / mid-stream server_error: retry
    TIMEOUT = "timeout"  # connect / first token / idle / total timeout: retry
    CONNECTION = "connection"  # reset, refused, truncated stream: retry
    PROTOCOL = "protocol"  # invalid SSE/JSON, missing finish_reason/[DONE]: retry


class _Attempt(NamedTuple):
    """What the plan does with this kind of error."""

    retryable: bool
    failover: bool
    disable_key_for: float | None


class _Client(NamedTuple):
    """What keel shows its client when this kind of error is final."""

    status: int
    type: str
    code: str | None  # None: pass the normalised upstream code through
    should_retry: bool


_AUTH, _QUOTA = AUTH_DISABLE_SECONDS, QUOTA_DISABLE_SECONDS

# Why the less obvious flags:
# * REQUEST_TOO_LARGE: OpenAI's "Request too large for …" (a 429!) fails on every deployment
#   with the same TPM limit, so never retry; one with a larger limit can serve it: fail over.
# * NOT_FOUND: a model missing on one deployment may exist on another of the same group.
# * CONTEXT_LENGTH: faults.md §1 "fail over only to a larger context"; picking a larger-context
#   deployment is a routing feature, so to the plan this is a client mistake.
# * MODERATION: faults.md §1 "same input fails everywhere on that provider".
# fmt: off
_ATTEMPT: dict[ErrorKind, _Attempt] = {
    ErrorKind.RATE_LIMIT:        _Attempt(retryable=True,  failover=True,  disable_key_for=None),
    ErrorKind.REQUEST_TOO_LARGE: _Attempt(retryable=False, failover=True,  disable_key_for=None),
    ErrorKind.QUOTA:             _Attempt(retryable=False, failover=True,  disable_key_for=_QUOTA),
    ErrorKind.AUTH:              _Attempt(retryable=False, failover=True,  disable_key_for=_AUTH),
    ErrorKind.INVALID_REQUEST:   _Attempt(retryable=False, failover=False, disable_key_for=None),
    ErrorKind.NOT_FOUND:         _Attempt(retryable=False, failover=True,  disable_key_for=None),
    ErrorKind.CONTEXT_LENGTH:    _Attempt(retryable=False, failover=False, disable_key_for=None),
    ErrorKind.MODERATION:        _Attempt(retryable=False, failover=False, disable_key_for=None),
    ErrorKind.OVERLOADED:        _Attempt(retryable=True,  failover=True,  disable_key_for=None),
    ErrorKind.SERVER:            _Attempt(retryable=True,  failover=True,  disable_key_for=None),
    ErrorKind.TIMEOUT:           _Attempt(retryable=True,  failover=True,  disable_key_for=None),
    ErrorKind.CONNECTION:        _Attempt(retryable=True,  failover=True,  disable_key_for=None),
    ErrorKind.PROTOCOL:          _Attempt(retryable=True,  failover=True,  disable_key_for=None),
}

# The table in the module docstring. MODERATION passes its code through (content_filter /
# data_inspection_failed) so clients can tell the filters apart.
_INVALID = "invalid_request_error"
_CLIENT: dict[ErrorKind, _Client] = {
    ErrorKind.RATE_LIMIT:        _Client(429, "rate_limit_error", "rate_limit_exceeded", True),
    ErrorKind.OVERLOADED:        _Client(503, "server_error", "server_is_overloaded", True),
    ErrorKind.QUOTA:             _Client(502, "upstream_quota_error", "insufficient_quota", False),
    ErrorKind.AUTH:              _Client(502, "upstream_auth_error", "upstream_auth_error", False),
    ErrorKind.REQUEST_TOO_LARGE: _Client(413, _INVALID, "request_too_large", False),
    ErrorKind.INVALID_REQUEST:   _Client(400, _INVALID, None, False),
    ErrorKind.CONTEXT_LENGTH:    _Client(400, _INVALID, "context_length_exceeded", False),
    ErrorKind.MODERATION:        _Client(400, _INVALID, None, False),
    ErrorKind.NOT_FOUND:         _Client(404, _INVALID, "model_not_found", False),
    ErrorKind.SERVER:            _Client(502, "server_error", "upstream_server_error", True),
    ErrorKind.CONNECTION:        _Client(502, "server_error", "upstream_connection_error", True),
    ErrorKind.PROTOCOL:          _Client(502, "server_error", "upstream_protocol_error", True),
    ErrorKind.TIMEOUT:           _Client(504, "timeout_error", "upstream_timeout", True),
}
# fmt: on


@dataclass(frozen=True, slots=True)
class UpstreamError:
    kind: ErrorKind
    message: str  # human text, never containing an API key
    status: int = 0  # upstream HTTP status; 0 when there was no response
    retryable: bool = False
    failover: bool = True
    retry_after: float | None = None  # seconds, from headers or the message text
    disable_key_for: float | None = None  # seconds to bench the key
    code: str | None = None  # upstream error code, normalised
    type: str | None = None  # OpenAI error type to show the client
    param: str | None = None
    # Added fields (all defaulted):
    output_filter: bool = False  # MODERATION of the *output* mid-stream: finish "content_filter"
    upstream_code: str | None = None  # the provider's own code/type, verbatim, for logs
    retry_after_source: str | None = None  # where retry_after came from, for logs
    request_id: str | None = None  # the provider's request id, for support tickets

    @property
    def client_status(self) -> int:
        """The HTTP status keel shows its client when this is the final error (see the table
        in the module docstring)."""
        return _CLIENT[self.kind].status

    @property
    def client_should_retry(self) -> bool:
        """The value of the ``x-should-retry`` header keel sends its client: false when
        retrying cannot help (quota, auth, client mistakes) or when the wait is longer than
        SDKs honor, so that SDKs in front of keel do not retry it three times."""
        if not _CLIENT[self.kind].should_retry:
            return False
        return self.retry_after is None or self.retry_after <= CLIENT_RETRY_AFTER_CAP

    def client_headers(self) -> dict[str, str]:
        """``x-should-retry`` and, when known, ``retry-after`` (whole seconds, rounded up)."""
        headers = {"x-should-retry": "true" if self.client_should_retry else "false"}
        if self.retry_after is not None and self.client_should_retry:
            headers["retry-after"] = str(math.ceil(self.retry_after))
        return headers

    def client_body(self) -> dict[str, Any]:
        """OpenAI-shaped ``{"error": {message, type, param, code}}``."""
        client = _CLIENT[self.kind]
        message = self.message
        # The client did nothing wrong here; say whose credentials/account failed so an
        # upstream "Incorrect API key provided" is not mistaken for the client's key.
        if self.kind is ErrorKind.AUTH:
            message = f"the upstream provider rejected keel's credentials: {message}"
        elif self.kind is ErrorKind.QUOTA:
            message = f"keel's upstream account is out of quota or credit: {message}"
        return {
            "error": {
                "message": message,
                "type": self.type or client.type,
                "param": self.param,
                "code": client.code or self.code,
            }
        }


def transport_error(kind: ErrorKind, message: str, *, status: int = 0) -> UpstreamError:
    """An error without an upstream error body: connect refused/reset and truncated streams
    (CONNECTION), connect/first-token/idle/total timeouts (TIMEOUT), invalid SSE/JSON or a
    stream without a terminal chunk (PROTOCOL). Flags come from the kind's row in
    ``_ATTEMPT``."""
    attempt, client = _ATTEMPT[kind], _CLIENT[kind]
    return UpstreamError(
        kind=kind,
        message=_clean_message(message),
        status=status,
        retryable=attempt.retryable,
        failover=attempt.failover,
        disable_key_for=attempt.disable_key_for,
        code=client.code,
        type=client.type,
    )


# --- key scrubbing ---------------------------------------------------------------------------

# "Incorrect API key provided: sk-abc…xyz." -> "… sk-***." (the trailing period survives).
_SK_KEY = re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-*.…]*[A-Za-z0-9_\-*…]")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9_\-.~+/=*…]+")
_PROVIDED_KEY = re.compile(r"(?i)(api[\s_-]?key provided:\s*)(?!sk-\*\*\*)\S+?(?=[.,;]?(?:\s|$))")
_QUERY_KEY = re.compile(r"(?i)([?&](?:api[-_]?)?key=)[^&\s]+")
# Long opaque tokens with letters and digits (Azure keys are 32 hex chars) ...
_LONG_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_\-])(?=[A-Za-z0-9_\-]*[0-9])(?=[A-Za-z0-9_\-]*[A-Za-z])"
    r"[A-Za-z0-9_\-]{32,}(?![A-Za-z0-9_\-])"
)
# ... except ids that support needs to see: request/completion/org/project ids and UUIDs.
_SAFE_ID = re.compile(
    r"(?:req_|request_|chatcmpl-|org-|proj_|msg_|call_|run_|thread_|asst_|batch_|file-)"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def scrub_secrets(text: str) -> str:
    """Replace anything that looks like an API key with ``sk-***`` / ``***``."""
    text = _SK_KEY.sub("sk-***", text)
    text = _BEARER.sub(r"\1***", text)
    text = _PROVIDED_KEY.sub(r"\1***", text)
    text = _QUERY_KEY.sub(r"\1***", text)
    return _LONG_TOKEN.sub(lambda m: m[0] if _SAFE_ID.match(m[0]) else "***", text)


def _clean_message(text: str) -> str:
    text = scrub_secrets(text.strip())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


# --- body parsing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fields:
    """What an error body says, whatever its shape."""

    message: str
    type: str | None = None
    code: str | None = None  # verbatim, non-numeric
    param: str | None = None
    inner_code: str | None = None  # Azure innererror.code
    status_hint: int = 0  # a numeric code in the body ("429", 400)
    request_id: str | None = None

    @property
    def tokens(self) -> frozenset[str]:
        """type/code/innererror normalised for matching: "InvalidApiKey", "invalid_api_key"
        and "invalid-api-key" all become "invalidapikey"."""
        raw = (self.type, self.code, self.inner_code)
        return frozenset(_norm(t) for t in raw if t)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _fields(payload: object) -> _Fields | None:
    """Fields from any error shape: OpenAI/Azure/DeepSeek ``{"error": {…}}`` (+ DashScope's
    top-level ``request_id``), Anthropic ``{"type": "error", "error": {…}}``, DashScope native
    ``{"code", "message"}``, vLLM ``{"object": "error", …, "code": 400}``, Ollama
    ``{"error": "…"}``, FastAPI ``{"detail": "…"}``, Gemini ``[{"error": {…}}]``."""
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    src: Mapping[str, Any] = error if isinstance(error, dict) else payload
    message = (
        _str(src.get("message"))
        or _str(error)
        or _str(payload.get("message"))
        or _str(payload.get("detail"))
        or ""
    )
    type_ = _str(src.get("type"))
    if type_ == "error" and src is payload:  # Anthropic's envelope, not an error type
        type_ = None
    raw_code = src.get("code")
    status_hint = 0
    code: str | None = None
    if isinstance(raw_code, int) and not isinstance(raw_code, bool):
        status_hint = raw_code
    elif isinstance(raw_code, str) and raw_code.strip().isdigit():
        status_hint = int(raw_code)  # Azure: {"code": "429"}
    else:
        code = _str(raw_code)
    if not 100 <= status_hint <= 599:
        status_hint = 0
    inner = src.get("innererror")
    return _Fields(
        message=message,
        type=type_,
        code=code,
        param=_str(src.get("param")),
        inner_code=_str(inner.get("code")) if isinstance(inner, dict) else None,
        status_hint=status_hint,
        request_id=_str(payload.get("request_id")),
    )


def _parse_body(status: int, body: bytes) -> _Fields:
    """Parse the body once; a non-JSON body becomes a message about the body, not the body."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:  # also raised for invalid UTF-8
        pass
    else:
        fields = _fields(payload)
        if fields is not None:
            return fields
        return _Fields(f"upstream returned HTTP {status} with a JSON body that is not an error")
    if not body.strip():
        return _Fields(f"upstream returned HTTP {status} with an empty body")
    message = f"upstream returned HTTP {status} with a non-JSON body"
    snippet = _plain_text(body)
    if snippet:  # e.g. Envoy's "upstream connect error or disconnect/reset before headers"
        message = f"{message}: {snippet}"
    return _Fields(message)


def _plain_text(body: bytes) -> str | None:
    """A short one-line plain-text body worth quoting; never HTML or JSON."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if len(text) > 200 or "\n" in text or text[:1] in ("<", "{", "[", '"'):
        return None
    return text if text.isprintable() else None


# --- the decision -------------------------------------------------------------------------------

_QUOTA_TOKENS = frozenset(
    {
        "insufficientquota",
        "creditbalanceexhausted",
        "organizationusagelimitexceeded",
        "arrearage",
        "billingerror",  # Anthropic 402
        "billinghardlimitreached",
        "billingnotactive",
        "enforcedspendlimitreached",
        "insufficientbalance",
    }
)
_QUOTA_MESSAGES = (
    "exceeded your current quota",  # OpenAI insufficient_quota, older bodies with code null
    "insufficient balance",  # DeepSeek 402
    "enforced_spend_limit_reached",  # Anthropic spend cap
    "spend limit",
    "good standing",  # DashScope Arrearage: "make sure your account is in good standing"
    "free allocated quota exceeded",  # DashScope free tier spent
    "hour allocated quota exceeded",  # DashScope Coding Plan 5-hour quota
    "credit balance is too low",  # Anthropic
)
# DashScope quotas that do not come back within a minute (free tier, Coding Plan 5 hours).
_DASHSCOPE_HARD_QUOTA = ("free allocated quota exceeded", "hour allocated quota exceeded")
_AUTH_TOKENS = frozenset(
    {
        "invalidapikey",
        "invalidauthentication",
        "authenticationerror",
        "permissionerror",
        "permissiondenied",
        "accessdenied",
        "unauthorized",
        "unsupportedcountryregionterritory",
    }
)
_AUTH_MESSAGES = ("incorrect api key", "invalid api key", "invalid api-key", "invalid access token")
_MODERATION_TOKENS = frozenset(
    {
        "datainspectionfailed",
        "contentfilter",
        "contentpolicyviolation",
        "responsibleaipolicyviolation",
    }
)
_CONTEXT_MESSAGE = re.compile(
    r"maximum context length|context.length.exceeded|context window|prompt is too long"
    r"|range of input length",
    re.IGNORECASE,
)
_RATE_LIMIT_TOKENS = frozenset(
    {"ratelimitexceeded", "ratelimiterror", "ratelimit", "toomanyrequests"}
)
_RATE_LIMIT_MESSAGES = ("rate limit", "too many requests", "too many concurrent requests")
_NOT_FOUND_TOKENS = frozenset(
    {"modelnotfound", "notfounderror", "notfound", "deploymentnotfound", "modelnotexist"}
)
_NOT_FOUND_MESSAGE = re.compile(
    r"\bmodel\b.*\b(?:does not exist|not found|not exist|is not supported)", re.IGNORECASE
)
_SERVER_TOKENS = frozenset({"servererror", "apierror", "internalerror", "internalservererror"})


def _decide(status: int, f: _Fields, dialect: Dialect) -> tuple[ErrorKind, str | None]:
    """(kind, normalised code). Order matters: the most specific evidence wins."""
    tokens = f.tokens
    msg = f.message.lower()
    # A 4xx that is the client's fault; message words must not turn it into a retry.
    client_side = 400 <= status < 500 and status not in (408, 409, 429)

    moderation = tokens & _MODERATION_TOKENS
    if moderation:
        # Keep DashScope's distinct code; Azure/OpenAI filters are all "content_filter".
        code = (
            "data_inspection_failed" if "datainspectionfailed" in moderation else "content_filter"
        )
        return ErrorKind.MODERATION, code

    if "contextlengthexceeded" in tokens or (client_side and _CONTEXT_MESSAGE.search(msg)):
        return ErrorKind.CONTEXT_LENGTH, "context_length_exceeded"

    # OpenAI's "Request too large for gpt-4 … on tokens per min" arrives as a 429 with
    # code rate_limit_exceeded, so it must be caught before the rate-limit rules.
    if status == 413 or "requesttoolarge" in tokens or "request too large" in msg:
        return ErrorKind.REQUEST_TOO_LARGE, "request_too_large"

    # DashScope's insufficient_quota is a TPM limit (its message links "#token-limit"), the
    # opposite of OpenAI's (faults.md §1). The link is the evidence; a DashScope dialect
    # breaks the tie when the message lacks it.
    if (
        "insufficientquota" in tokens
        and ("token-limit" in msg or (dialect is Dialect.DASHSCOPE and status == 429))
        and not any(m in msg for m in _DASHSCOPE_HARD_QUOTA)
    ):
        return ErrorKind.RATE_LIMIT, "rate_limit_exceeded"

    if (
        status == 402
        or tokens & _QUOTA_TOKENS
        or any(t.endswith("spendlimitexceeded") for t in tokens)
        or any(m in msg for m in _QUOTA_MESSAGES)
    ):
        return ErrorKind.QUOTA, "insufficient_quota"

    if status in (401, 403) or tokens & _AUTH_TOKENS or any(m in msg for m in _AUTH_MESSAGES):
        return ErrorKind.AUTH, "invalid_api_key"

    # Anthropic 529 overloaded_error, Moonshot 429 engine_overloaded_error, OpenAI 503
    # server_is_overloaded / "That model is currently overloaded with other requests."
    if (
        status == 529
        or any("overloaded" in t for t in tokens)
        or (not client_side and "overloaded" in msg)
    ):
        return ErrorKind.OVERLOADED, "server_is_overloaded"

    # OpenAI 429 rate_limit_exceeded, DashScope rate_limit_error / Throttling.*, Anthropic
    # rate_limit_error, Azure {"code": "429"}.
    if (
        status == 429
        or f.status_hint == 429
        or tokens & _RATE_LIMIT_TOKENS
        or any(t.startswith("throttling") for t in tokens)
        or (not client_side and any(m in msg for m in _RATE_LIMIT_MESSAGES))
    ):
        return ErrorKind.RATE_LIMIT, "rate_limit_exceeded"

    if (
        status == 404
        or tokens & _NOT_FOUND_TOKENS
        or (status == 400 and _NOT_FOUND_MESSAGE.search(msg))
    ):
        return ErrorKind.NOT_FOUND, "model_not_found"

    if status == 408:
        return ErrorKind.TIMEOUT, "upstream_timeout"
    if 400 <= status < 500 and status != 409:
        return ErrorKind.INVALID_REQUEST, f.code
    # 5xx, 409 (a transient conflict the openai SDK retries), an unrecognised error frame in
    # a stream (status 0) or a 2xx carrying a server error body.
    if status >= 500 or status in (0, 409) or tokens & _SERVER_TOKENS:
        return ErrorKind.SERVER, "upstream_server_error"
    return ErrorKind.PROTOCOL, "upstream_protocol_error"


def _rate_limit_dimension(f: _Fields) -> str | None:
    """Which OpenAI limit ran out: its 429 ``type`` is "requests"/"tokens"; messages say
    "on tokens per min (TPM)"."""
    if f.type in ("requests", "tokens"):
        return f.type
    msg = f.message.lower()
    if "tokens per" in msg or "(tpm)" in msg or "(tpd)" in msg:
        return "tokens"
    if "requests per" in msg or "(rpm)" in msg or "(rpd)" in msg:
        return "requests"
    return None


def _dialect(dialect: Dialect | str) -> Dialect:
    try:
        return Dialect(str(dialect).lower())
    except ValueError:
        return Dialect.OPENAI


def _build(
    kind: ErrorKind,
    code: str | None,
    f: _Fields,
    status: int,
    headers: Mapping[str, str],
    now: float,
) -> UpstreamError:
    attempt = _ATTEMPT[kind]
    # 1xx/3xx: a redirect or similar that an API should never send; asking again won't help.
    retryable = attempt.retryable and not (100 <= status < 200 or 300 <= status < 400)
    # x-should-retry is the provider saying whether *this* request may succeed if repeated
    # (Anthropic 529 sends "true"). It overrides the status default, except for a bad key or
    # an unpaid bill, which benching decides; it never changes ``failover``, so a client
    # mistake stays a client mistake.
    h = lower_headers(headers)
    should_retry = h.get("x-should-retry", "").strip().lower()
    if kind not in (ErrorKind.AUTH, ErrorKind.QUOTA) and should_retry in ("true", "false"):
        retryable = should_retry == "true"

    message = _clean_message(f.message)
    if not message:
        message = f"upstream returned HTTP {status}" if status else "upstream error"
        if f.code or f.type:
            message += f" ({f.code or f.type})"

    retry_after: float | None = None
    source: str | None = None
    if retryable:
        hint = retry_after_hint_with_source(
            h,
            message,
            now,
            limit=_rate_limit_dimension(f) if kind is ErrorKind.RATE_LIMIT else None,
            # x-ratelimit-reset-* come with every response; they mean "wait" only on a 429.
            use_reset_headers=kind is ErrorKind.RATE_LIMIT,
        )
        if hint is not None:
            retry_after, source = hint

    request_id = (
        f.request_id or h.get("x-request-id") or h.get("request-id") or h.get("apim-request-id")
    )
    return UpstreamError(
        kind=kind,
        message=message,
        status=status,
        retryable=retryable,
        failover=attempt.failover,
        retry_after=retry_after,
        disable_key_for=attempt.disable_key_for,
        code=code,
        type=_CLIENT[kind].type,
        param=f.param,
        upstream_code=f.code or f.type or (str(f.status_hint) if f.status_hint else None),
        retry_after_source=source,
        request_id=request_id,
    )


def classify_response(
    dialect: Dialect | str, status: int, headers: Mapping[str, str], body: bytes, now: float
) -> UpstreamError:
    """Classify a non-2xx upstream response. ``now`` is wall-clock epoch seconds (for HTTP
    dates and RFC 3339 reset timestamps)."""
    fields = _parse_body(status, body)
    kind, code = _decide(status, fields, _dialect(dialect))
    error = _build(kind, code, fields, status, headers, now)
    # DashScope answers a non-stream request whose *output* failed moderation with a 400
    # "Output data may contain inappropriate content."; the gateway can end it as
    # finish_reason "content_filter", as it does mid-stream.
    if kind is ErrorKind.MODERATION and "output" in error.message.lower():
        error = replace(error, output_filter=True)
    return error


def classify_stream_error(dialect: Dialect | str, payload: Mapping[str, Any]) -> UpstreamError:
    """Classify an error frame that arrived inside a 200 stream (OpenAI ``{"error": …}``,
    DashScope output moderation, Anthropic ``{"type":"error","error":{…}}``).

    There is no HTTP status; a numeric ``code`` in the frame (vLLM's ``400``, Azure's
    ``"429"``) stands in for one. Anything unrecognised is a SERVER error: the stream broke.
    Moderation inside a stream is output moderation (``output_filter``) unless the message
    says it was the input, so the gateway can end the stream with ``content_filter``.
    """
    fields = _fields(payload if isinstance(payload, dict) else dict(payload)) or _Fields("")
    if not fields.message:
        fields = replace(fields, message="upstream sent an error frame inside the stream")
    kind, code = _decide(fields.status_hint, fields, _dialect(dialect))
    # The HTTP status was 200; message hints need no clock, and there are no headers.
    error = _build(kind, code, fields, 200, {}, 0.0)
    if kind is ErrorKind.MODERATION and "input" not in error.message.lower():
        error = replace(error, output_filter=True)
    return error
