"""``POST /v1/completions`` (legacy text completions) and ``GET /v1/models/{id}`` through keel:
``keel serve`` with the openai SDK, and library mode (``Keel.completions``,
``Keel.completions_stream``, ``gw.transport()``), against faulty simulators. Exact text;
failures before the first byte retried and failed over (attempts counted in the simulators'
logs); a stream broken after bytes reached the client ends with an OpenAI-shaped error event
and ``[DONE]`` — never a silent end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from auth_helpers import ADMIN, http, write_config
from gw_fixtures import log_of, unique
from keel import Keel, KeelError
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway

CLIENT = "sk-cmpl-client-0123456789abcdef"
PRE_FIRST_BYTE = ["e503", "e500", "r429", "reset", "trunc=0", "stall=0", "err_mid=0"]
BROKEN_BODIES = ["trunc", "no_finish", "null_finish", "garbage_fatal", "e502_html"]


def config(a: str, b: str) -> dict[str, Any]:
    fast = {"first_token": 1.0, "idle": 1.0}
    return {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05, "max_retries_per_deployment": 2},
        "breaker": {"enabled": False},  # faults are injected into one deployment on purpose
        "clients": {"app": {"key": CLIENT}},
        "models": {
            "text": {
                "deployments": [
                    {"name": "ca", "base_url": a, "model": "gpt-3.5-turbo-instruct",
                     "timeouts": fast},
                    {"name": "cb", "base_url": b, "model": "qwen-instruct",
                     "dialect": "dashscope", "timeouts": fast},
                ]
            },
            "text-solo": {"deployments": [{"name": "ca-solo", "base_url": a, "timeouts": fast}]},
            # Holds the first 1000 tokens: a break inside them restarts the answer invisibly.
            "text-held": {
                "deployments": [{"name": "ca-held", "base_url": a, "timeouts": fast}],
                "commit_buffer": {"tokens": 1000},
            },
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def gateway(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims
    with spawn_gateway(
        config(a.base_url, b.base_url), workdir=str(tmp_path_factory.mktemp("cmpl"))
    ) as gw:
        yield gw


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=CLIENT, max_retries=0)


@pytest.fixture
async def gw(sims: tuple[SimProcess, SimProcess]) -> AsyncIterator[Keel]:
    a, b = sims
    async with Keel.from_config(config(a.base_url, b.base_url)) as k:
        yield k


def sse_events(gateway: GatewayProcess, body: dict[str, Any]) -> list[str]:
    r = httpx.post(
        gateway.base_url + "/completions",
        json={**body, "stream": True},
        headers={"authorization": f"Bearer {CLIENT}"},
        timeout=10,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    return [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]


# -- non-stream ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", PRE_FIRST_BYTE + BROKEN_BODIES)
def test_non_stream_failures_are_invisible(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess], fault: str
) -> None:
    prompt = unique("Once upon a time")
    raw = client.completions.with_raw_response.create(
        model="text", prompt=f"{prompt} [[sim:{fault}*1]]"
    )
    got = raw.parse()
    assert got.object == "text_completion"
    assert got.choices[0].text == answer_text(prompt) and got.choices[0].finish_reason == "stop"
    assert raw.headers["x-keel-attempts"] == "3"
    log = log_of(sims, prompt)
    assert len(log) == 3 and {log[0].sim, log[1].sim} == {"a", "b"}
    assert [e.fault for e in log] == [fault.split("=")[0]] * 2 + [None]
    assert all(e.kind == "completions" and not e.stream for e in log)


def test_max_tokens_and_the_deployments_model(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("short")
    got = client.completions.create(model="text", prompt=f"{prompt} [[sim:e500*1]]", max_tokens=5)
    assert got.choices[0].text == answer_text(prompt, 5)
    assert got.choices[0].finish_reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == 5
    models = {e.sim: e.model for e in log_of(sims, prompt)}
    assert models == {"a": "gpt-3.5-turbo-instruct", "b": "qwen-instruct"}


# -- stream -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", PRE_FIRST_BYTE)
def test_stream_failures_before_the_first_byte_are_invisible(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess], fault: str
) -> None:
    prompt = unique("流 stream me")
    chunks = list(
        client.completions.create(
            model="text", prompt=f"{prompt} [[sim:{fault}*1]]", stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == answer_text(prompt)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert all(c.object == "text_completion" for c in chunks)
    log = log_of(sims, prompt)
    assert len(log) == 3 and [e.fault for e in log] == [fault.split("=")[0]] * 2 + [None]
    assert all(e.stream for e in log)


@pytest.mark.parametrize("fault", ["trunc=5", "trunc_mid=5", "err_mid=5", "no_finish", "no_done"])
def test_a_stream_broken_after_bytes_ends_with_an_error_event(
    client: openai.OpenAI,
    gateway: GatewayProcess,
    sims: tuple[SimProcess, SimProcess],
    fault: str,
) -> None:
    prompt = unique("broken after bytes")
    got: list[str] = []
    with pytest.raises(openai.APIError):
        for c in client.completions.create(
            model="text-solo", prompt=f"{prompt} [[sim:{fault}]]", stream=True
        ):
            got.append(c.choices[0].text)
    full = answer_text(prompt)
    shown = "".join(got)
    assert shown and full.startswith(shown)
    # On the wire: the text chunks, one OpenAI-shaped error event, then [DONE].
    events = sse_events(gateway, {"model": "text-solo", "prompt": f"{prompt} [[sim:{fault}]]"})
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (
        set(error) == {"message", "type", "param", "code"}
        and "upstream attempts" in error["message"]
    )
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-2])
    # Not continued elsewhere: each request made exactly one attempt.
    assert len(log_of(sims, prompt)) == 2


def test_a_break_inside_the_commit_buffer_restarts_invisibly(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("held back")
    stream = client.completions.create(
        model="text-held", prompt=f"{prompt} [[sim:trunc_mid=10*1]]", stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == answer_text(prompt)
    assert [e.fault for e in log_of(sims, prompt)] == ["trunc_mid", None]


def test_bad_bodies(gateway: GatewayProcess, sims: tuple[SimProcess, SimProcess]) -> None:
    before = sum(len(s.log()) for s in sims)
    for body, param in [
        ({"model": "text"}, "prompt"),
        ({"model": "text", "prompt": 3}, "prompt"),
        ({"model": "text", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "text", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "text", "prompt": "x", "n": 0}, "n"),
        ({"model": "text", "prompt": "x", "stream_options": []}, "stream_options"),
    ]:
        status, _, out = http("POST", gateway.base_url + "/completions", body, CLIENT)
        assert status == 400 and out["error"]["param"] == param, (body, out)
    assert sum(len(s.log()) for s in sims) == before


# -- library mode -------------------------------------------------------------------------------


async def test_library_completions(gw: Keel, sims: tuple[SimProcess, SimProcess]) -> None:
    prompt = unique("library text")
    got = await gw.completions({"model": "text", "prompt": f"{prompt} [[sim:e503*1]]"})
    assert got["choices"][0]["text"] == answer_text(prompt)
    assert len(log_of(sims, prompt)) == 3

    prompt = unique("library stream")
    chunks = [
        c
        async for c in gw.completions_stream(
            {"model": "text", "prompt": f"{prompt} [[sim:reset*1]]"}
        )
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer_text(prompt)
    assert len(log_of(sims, prompt)) == 3

    prompt = unique("library broken")
    seen = ""
    with pytest.raises(KeelError) as err:
        async for c in gw.completions_stream(
            {"model": "text-solo", "prompt": f"{prompt} [[sim:trunc=4]]"}
        ):
            seen += c["choices"][0]["text"]
    assert seen and answer_text(prompt).startswith(seen) and err.value.status == 502
    with pytest.raises(KeelError) as err:
        await gw.completions({"model": "text"})
    assert err.value.status == 400 and err.value.body["error"]["param"] == "prompt"


async def test_the_sdk_through_the_transport(gw: Keel, sims: tuple[SimProcess, SimProcess]) -> None:
    sdk = openai.AsyncOpenAI(
        base_url="http://keel/v1",
        api_key=CLIENT,
        http_client=httpx.AsyncClient(transport=gw.transport()),
        max_retries=0,
    )
    prompt = unique("transport text")
    stream = await sdk.completions.create(
        model="text", prompt=f"{prompt} [[sim:stall=0*1]]", stream=True
    )
    assert "".join([c.choices[0].text async for c in stream]) == answer_text(prompt)
    assert len(log_of(sims, prompt)) == 3
    got = await sdk.completions.create(model="text", prompt=f"{prompt} [[sim:no_finish*1]]")
    assert got.choices[0].text == answer_text(prompt)
    model = await sdk.models.retrieve("text-solo")
    assert (model.id, model.object, model.owned_by) == ("text-solo", "model", "keel")
    with pytest.raises(openai.NotFoundError) as err:
        await sdk.models.retrieve("gpt-9")
    assert err.value.code == "model_not_found"


# -- GET /v1/models/{id} ------------------------------------------------------------------------


def test_models_retrieve(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    m = client.models.retrieve("text")
    assert (m.id, m.object, m.owned_by) == ("text", "model", "keel")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-9")
    assert (
        err.value.code == "model_not_found"
        and "Available: text, text-held, text-solo" in (err.value.body["message"])
    )
    status, headers, body = http("DELETE", gateway.base_url + "/models/text", token=CLIENT)
    assert status == 405 and headers["allow"] == "GET, HEAD"
    # Unknown paths under /v1/ still answer an OpenAI-shaped 404 naming what keel serves.
    status, _, body = http("POST", gateway.base_url + "/files", {}, CLIENT)
    assert status == 404 and body["error"]["code"] == "unknown_url"
    for endpoint in ("POST /v1/embeddings", "POST /v1/completions", "GET /v1/models/{id}"):
        assert endpoint in body["error"]["message"]
    assert http("GET", gateway.base_url + "/models/text")[0] == 401  # the same keys as chat


def test_a_key_only_sees_the_models_it_may_use(
    sims: tuple[SimProcess, SimProcess], tmp_path: Path
) -> None:
    a, _ = sims
    cfg = {
        "server": {"admin_key": ADMIN},
        "models": {
            "text": {"deployments": [{"base_url": a.base_url}]},
            "other": {"deployments": [{"base_url": a.base_url, "name": "other-0"}]},
        },
    }
    with spawn_gateway(str(write_config(tmp_path, cfg))) as g:
        made = http("POST", g.url + "/admin/keys", {"name": "narrow", "models": ["text"]}, ADMIN)
        narrow = openai.OpenAI(base_url=g.base_url, api_key=made[2]["key"], max_retries=0)
        assert narrow.models.retrieve("text").id == "text"
        with pytest.raises(openai.NotFoundError) as err:
            narrow.models.retrieve("other")
        assert err.value.code == "model_not_found"
        assert err.value.body["message"] == (
            "The model 'other' does not exist or key 'narrow' may not use it. Available: text."
        )
        with pytest.raises(openai.NotFoundError):
            narrow.completions.create(model="other", prompt="hi")
