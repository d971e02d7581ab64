"""``POST /v1/embeddings`` through keel: ``keel serve`` with the openai SDK and library mode
(``Keel.embeddings``, ``gw.transport()``), against simulators whose vectors are a pure function
of the input (``keel.sim.embedding_for``). Exact vectors; failures before the answer retried and
failed over (attempts counted in the simulators' logs); the deployment's own model name sent
upstream; the client's TPM counting the input's tokens; OpenAI-shaped 400s for bad bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from gw_fixtures import log_of, unique
from keel import Keel, KeelError
from keel.engine._embeddings import EMBEDDINGS
from keel.engine._upstream import AttemptFailed
from keel.sim import DIMENSIONS, embedding_base64, embedding_for
from keel.testing import GatewayProcess, SimProcess, spawn_gateway

CLIENT = "sk-embed-client-0123456789abcdef"
METERED = "sk-embed-metered-0123456789abcdef"
# Pre-first-byte faults (and broken bodies) that must be invisible: each simulator fails the
# prompt once, so the answer takes three attempts — one deployment, the other, then a retry.
FAULTS = [
    "e503",
    "e500",
    "r429",
    "reset",
    "trunc",
    "trunc_mid",
    "garbage_fatal",
    "stall",
    "err_mid",
]


def config(a: str, b: str) -> dict[str, Any]:
    fast = {"first_token": 1.0}
    return {
        "server": {"max_body_bytes": 1 << 20},
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05, "max_retries_per_deployment": 2},
        "breaker": {"enabled": False},  # faults are injected into one deployment on purpose
        "clients": {"app": {"key": CLIENT}, "metered": {"key": METERED, "tpm": 60}},
        "models": {
            "emb": {
                "deployments": [
                    {"name": "ea", "base_url": a, "model": "text-embedding-3-small",
                     "timeouts": fast},
                    {"name": "eb", "base_url": b, "model": "text-embedding-v3",
                     "dialect": "dashscope", "timeouts": fast},
                ]
            },
            "emb-solo": {"deployments": [{"name": "ea-solo", "base_url": a, "timeouts": fast}]},
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def gateway(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims
    with spawn_gateway(
        config(a.base_url, b.base_url), workdir=str(tmp_path_factory.mktemp("emb"))
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


@pytest.mark.parametrize("fault", FAULTS)
def test_failures_before_the_answer_are_invisible(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess], fault: str
) -> None:
    first, second = unique("embed me"), unique("你好 embed me too")
    raw = client.embeddings.with_raw_response.create(
        model="emb", input=[f"{first} [[sim:{fault}*1]]", second], dimensions=64
    )
    got = raw.parse()
    # The SDK asks for base64 and decodes it: the floats are the simulator's float32 values.
    assert [d.embedding for d in got.data] == [embedding_for(first, 64), embedding_for(second, 64)]
    assert [d.index for d in got.data] == [0, 1]
    assert raw.headers["x-keel-attempts"] == "3"
    log = log_of(sims, first)
    assert len(log) == 3 and {log[0].sim, log[1].sim} == {"a", "b"}
    assert [e.fault for e in log] == [fault, fault, None] and log[2].finished
    assert all(e.kind == "embeddings" for e in log)


@pytest.mark.parametrize("fault", ["garbage_fatal", "trunc_mid", "e503"])
def test_float_answers_are_checked_too(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess], fault: str
) -> None:
    """A float answer is checked by its frame, not parsed: a body cut short is still a
    failed attempt, never relayed."""
    text = unique("float frame")
    got = client.embeddings.create(
        model="emb", input=[f"{text} [[sim:{fault}*1]]", "b", "c"], dimensions=48,
        encoding_format="float",
    )  # fmt: skip
    want = [embedding_for(text, 48), embedding_for("b", 48), embedding_for("c", 48)]
    assert [d.embedding for d in got.data] == want
    assert got.usage.prompt_tokens == -(-len(text) // 4) + 2
    assert [e.fault for e in log_of(sims, text)] == [fault, fault, None]


def test_each_deployment_gets_its_own_model_name(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    text = unique("model mapping")
    got = client.embeddings.create(model="emb", input=f"{text} [[sim:e503*1]]")
    assert got.data[0].embedding == embedding_for(text)  # the default dimensions
    assert len(got.data[0].embedding) == DIMENSIONS
    models = {e.sim: e.model for e in log_of(sims, text)}
    assert models == {"a": "text-embedding-3-small", "b": "text-embedding-v3"}
    assert got.model in models.values()


def test_floats_token_arrays_and_usage(client: openai.OpenAI) -> None:
    text = unique("floats")
    got = client.embeddings.create(
        model="emb-solo", input=text, dimensions=16, encoding_format="float"
    )
    assert got.data[0].embedding == embedding_for(text, 16)
    assert got.usage.prompt_tokens == got.usage.total_tokens == -(-len(text) // 4)
    tokens = client.embeddings.create(model="emb-solo", input=[[1, 2, 3], [40, 50]], dimensions=8)
    assert [d.embedding for d in tokens.data] == [
        embedding_for([1, 2, 3], 8),
        embedding_for([40, 50], 8),
    ]
    one = client.embeddings.create(model="emb-solo", input=[7, 8, 9], dimensions=8)
    assert [d.embedding for d in one.data] == [embedding_for([7, 8, 9], 8)]
    assert one.usage.prompt_tokens == 3


def test_a_deployment_that_keeps_failing_ends_in_its_error(
    client: openai.OpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    text = unique("always down")
    with pytest.raises(openai.InternalServerError) as err:
        client.embeddings.create(model="emb-solo", input=f"{text} [[sim:e503]]")
    assert err.value.status_code == 503
    assert "upstream attempts: ea-solo" in err.value.body["message"]
    assert [e.fault for e in log_of(sims, text)] == ["e503"] * 3  # 1 + 2 retries, no more


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "emb"}, "input"),
        ({"model": "emb", "input": ""}, "input"),
        ({"model": "emb", "input": []}, "input"),
        ({"model": "emb", "input": ["a", 3]}, "input"),
        ({"model": "emb", "input": [1, "a"]}, "input"),
        ({"model": "emb", "input": [[1, 2], []]}, "input"),
        ({"model": "emb", "input": [-1]}, "input"),
        ({"model": "emb", "input": ["x"] * 2049}, "input"),
        ({"model": "emb", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "emb", "input": "x", "dimensions": True}, "dimensions"),
        ({"model": "emb", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x"}, "model"),
    ],
)
def test_bad_bodies_get_a_400_naming_the_field(
    gateway: GatewayProcess, sims: tuple[SimProcess, SimProcess], body: dict, param: str
) -> None:
    before = sum(len(s.log()) for s in sims)
    r = httpx.post(
        gateway.base_url + "/embeddings", json=body, headers={"authorization": f"Bearer {CLIENT}"}
    )
    assert r.status_code == 400 and r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert f"'{param}'" in err["message"] or f"{param}[" in err["message"]
    assert sum(len(s.log()) for s in sims) == before  # nothing went upstream


def test_not_json_and_unknown_models(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    r = httpx.post(
        gateway.base_url + "/embeddings",
        content=b'{"model": "emb", "input": ',
        headers={"authorization": f"Bearer {CLIENT}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="nope", input="x")
    assert err.value.code == "model_not_found"
    assert err.value.body["message"].startswith("The model 'nope' does not exist on this gateway.")


def test_the_clients_tpm_counts_the_input_tokens(gateway: GatewayProcess) -> None:
    """60 tokens a minute, a minute's burst: three inputs of 20 tokens fit, a fourth does
    not — a chat request would have booked its typical completion (256 tokens) on top."""
    metered = openai.OpenAI(base_url=gateway.base_url, api_key=METERED, max_retries=0)
    text = unique("tpm").ljust(80, "x")[:80]  # 80 ASCII characters: 20 tokens
    for _ in range(3):
        assert metered.embeddings.create(model="emb-solo", input=text, dimensions=4).data
    with pytest.raises(openai.RateLimitError) as err:
        metered.embeddings.create(model="emb-solo", input=text, dimensions=4)
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.body["type"] == "tokens"
    assert err.value.response.headers["x-ratelimit-limit-tokens"] == "60"


# -- library mode -------------------------------------------------------------------------------


async def test_library_embeddings(gw: Keel, sims: tuple[SimProcess, SimProcess]) -> None:
    text = unique("library")
    got = await gw.embeddings(
        {"model": "emb", "input": f"{text} [[sim:reset*1]]", "dimensions": 32,
         "encoding_format": "base64"}
    )  # fmt: skip
    assert got["data"][0]["embedding"] == embedding_base64(text, 32)
    assert len(log_of(sims, text)) == 3
    with pytest.raises(KeelError) as err:
        await gw.embeddings({"model": "emb", "input": [[]]})
    assert err.value.status == 400 and err.value.body["error"]["param"] == "input"


async def test_the_sdk_through_the_transport(gw: Keel, sims: tuple[SimProcess, SimProcess]) -> None:
    sdk = openai.AsyncOpenAI(
        base_url="http://keel/v1",
        api_key=CLIENT,
        http_client=httpx.AsyncClient(transport=gw.transport()),
        max_retries=0,
    )
    text = unique("transport")
    got = await sdk.embeddings.create(
        model="emb", input=[f"{text} [[sim:trunc*1]]", "second"], dimensions=24
    )
    assert [d.embedding for d in got.data] == [embedding_for(text, 24), embedding_for("second", 24)]
    assert len(log_of(sims, text)) == 3
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.embeddings.create(model="emb", input="x", dimensions=-3)
    assert err.value.body["param"] == "dimensions"


# -- the answer check, table by table (no network) ------------------------------------------


def _answer(n: int, sep: str = "", usage: str = '{"prompt_tokens": 5, "total_tokens": 5}') -> bytes:
    items = ", ".join(
        f'{{"object":{sep}"embedding", "index":{sep}{i}, "embedding":{sep}[0.5, -1e-3, 2]}}'
        for i in range(n)
    )
    return f'{{"object": "list", "data": [{items}], "model": "m", "usage":{sep}{usage}}}\n'.encode()


NESTED = '{"prompt_tokens": 5, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}'


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize(
    ("raw", "inputs", "usage"),
    [
        (_answer(1), "x", {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0}),
        (
            _answer(2, " "),
            ["x", "y"],
            {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0},
        ),
        (_answer(1, usage=NESTED), [1, 2], {**json.loads(NESTED), "completion_tokens": 0}),
        (_answer(1, usage="null"), "x", None),
    ],
)
def test_whole_answers_pass(raw: bytes, inputs: Any, usage: Any, encoding: str) -> None:
    assert EMBEDDINGS.answer(raw, {"input": inputs, "encoding_format": encoding}) == usage


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize(
    ("raw", "inputs", "why"),
    [
        (_answer(2)[:-30], ["x", "y"], "not JSON"),
        (b'{"object": "list", "data": [{"embedding": [0.5, -1', "x", "cut short"),
        (_answer(1), ["x", "y"], "1 embeddings for 2 inputs"),
        (b"<html>502</html>", "x", "not"),
        (b"", "x", "not"),
    ],
)
def test_broken_answers_fail_the_attempt(raw: bytes, inputs: Any, why: str, encoding: str) -> None:
    with pytest.raises(AttemptFailed) as err:
        EMBEDDINGS.answer(raw, {"input": inputs, "encoding_format": encoding})
    assert why in err.value.error.message
