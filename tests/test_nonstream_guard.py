"""The non-stream answer guard: a completion without a finish_reason is not known to be
complete, so keel retries it like a truncated stream instead of passing it off as success."""

from __future__ import annotations

import openai
import pytest
from openai import AsyncOpenAI

from gw_fixtures import entries_for, unique
from keel.sim import answer_text

FAULTS = ["no_finish", "null_finish", "empty_finish"]


@pytest.fixture
async def client(gateway) -> AsyncOpenAI:
    async with AsyncOpenAI(
        base_url=gateway.base_url, api_key="sk-client", max_retries=0, timeout=20
    ) as c:
        yield c


@pytest.mark.parametrize("fault", FAULTS)
async def test_missing_finish_reason_is_retried(client, sims, fault) -> None:
    prompt = unique()
    done = await client.chat.completions.create(
        model="solo", messages=[{"role": "user", "content": f"{prompt} [[sim:{fault}*1]]"}]
    )
    assert done.choices[0].message.content == answer_text(prompt)
    assert done.choices[0].finish_reason == "stop"
    first, second = entries_for(sims[0], prompt)
    assert first.fault == fault and second.fault is None


@pytest.mark.parametrize("fault", FAULTS)
async def test_persistently_missing_finish_reason_is_an_honest_error(client, fault) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="solo", messages=[{"role": "user", "content": f"{unique()} [[sim:{fault}]]"}]
        )
    assert info.value.status_code == 502
    assert "finish_reason" in info.value.message
