"""Output moderation on the non-stream path, handled like the stream path handles it.

DashScope answers a non-stream request whose *output* failed moderation with HTTP 400
"Output data may contain inappropriate content." (the classifier flags it ``output_filter``).
Mid-stream the same verdict ends the stream with ``finish_reason: "content_filter"``; here the
group's ``on_content_filter`` decides the same way:

* ``pass`` — answer 200 with an empty message and ``finish_reason: "content_filter"``, the
  way OpenAI reports filtered output; the client gets no exception;
* ``failover`` — try the next deployment (another provider may answer), never the same one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson

from keel.gateway._attempts import Exhausted
from keel.gateway._deployment import Deployment
from keel.gateway._upstream import AttemptFailed

T = TypeVar("T")


def fail_over_filtered_output(
    attempt: Callable[[Deployment], Awaitable[T]], mode: str
) -> Callable[[Deployment], Awaitable[T]]:
    """With ``failover``, an output-moderation error sends the request elsewhere."""
    if mode != "failover":
        return attempt

    async def wrapped(dep: Deployment) -> T:
        try:
            return await attempt(dep)
        except AttemptFailed as failed:
            if not failed.error.output_filter:
                raise
            err = dataclasses.replace(failed.error, failover=True, retryable=False)
            raise AttemptFailed(err) from None

    return wrapped


def content_filter_answer(exc: Exhausted, mode: str, request_id: str, model: str) -> bytes | None:
    """With ``pass``, the completion to send when the attempts ended on output moderation."""
    if mode != "pass" or not exc.tried or not exc.tried[-1].error.output_filter:
        return None
    return orjson.dumps(
        {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": "content_filter",
                }
            ],
        }
    )
