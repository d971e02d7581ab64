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


# --- output moderation on the non-stream path ------------------------------------------------


async def test_output_moderation_becomes_content_filter(client, sims) -> None:
    """on_content_filter: pass (the default) — a 200 the way OpenAI reports filtered output,
    no exception for the client (as mid-stream), no retry (the same output fails again)."""
    prompt = unique()
    raw = await client.chat.completions.with_raw_response.create(
        model="solo", messages=[{"role": "user", "content": f"{prompt} [[sim:inspect_mid]]"}]
    )
    done = raw.parse()
    assert done.choices[0].finish_reason == "content_filter"
    assert done.choices[0].message.content == ""
    assert raw.headers["x-keel-attempts"] == "1"
    assert len(entries_for(sims[0], prompt)) == 1


async def test_output_moderation_fails_over_when_configured(client, sims) -> None:
    """on_content_filter: failover — the next deployment answers, the filtering one is not
    retried."""
    prompt = unique()
    raw = await client.chat.completions.with_raw_response.create(
        model="filtering",
        messages=[{"role": "user", "content": f"{prompt} [[sim@a:inspect_mid]]"}],
    )
    done = raw.parse()
    assert done.choices[0].message.content == answer_text(prompt)
    assert done.choices[0].finish_reason == "stop"
    assert raw.headers["x-keel-deployment"] == "backup/0"
    assert len(entries_for(sims[0], prompt)) == 1


async def test_input_moderation_is_still_a_400(client, sims) -> None:
    prompt = unique()
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="filtering", messages=[{"role": "user", "content": f"{prompt} [[sim:inspect]]"}]
        )
    assert info.value.code == "data_inspection_failed"
    assert len(entries_for(sims[1], prompt)) == 0  # the same input fails everywhere
