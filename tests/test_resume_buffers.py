"""The resume buffers' own rules, on the real ``Streams`` registry: what a follower gets, the
byte caps and the stream cap, and expiry after the grace."""

from __future__ import annotations

import asyncio

import pytest

from keel.config._streams import ResumeConfig
from keel.engine._errors import KeelError
from keel.engine._resume import Streams, parse_last_event_id


async def _all(buf, after: int) -> list[tuple[int, bytes]]:
    out = []
    async for first, batch in buf.follow(after):
        out.extend(enumerate(batch, first))
    return out


async def test_followers_get_exactly_the_chunks_after_their_seq_then_live() -> None:
    streams = Streams(ResumeConfig())
    buf = streams.open("alice")
    await buf.commit({"x-request-id": "r"})
    await buf.send([b"a", b"b", b"c"])
    follower = asyncio.ensure_future(_all(buf, 1))
    await asyncio.sleep(0)
    await buf.send([b"d"])
    await buf.end([b"e"])
    assert await follower == [(2, b"c"), (3, b"d"), (4, b"e")]
    assert await _all(buf, -1) == list(enumerate([b"a", b"b", b"c", b"d", b"e"]))
    assert await _all(buf, 4) == []
    assert buf.headers == {"x-request-id": "r", "x-keel-stream-id": buf.sid}
    await streams.close()


async def test_a_stream_keeps_at_most_max_stream_bytes_and_says_gone_for_older_seqs() -> None:
    streams = Streams(ResumeConfig(max_stream_bytes=10))
    buf = streams.open("alice")
    await buf.send([b"0123", b"4567", b"89ab", b"cdef"])
    assert buf.size <= 10 and buf.base == 2 and streams.total == buf.size
    with pytest.raises(KeelError) as info:
        await _all(buf, 0)
    assert info.value.status == 410 and "before seq 2" in info.value.message
    await buf.end([])
    assert await _all(buf, 1) == [(2, b"89ab"), (3, b"cdef")]
    await streams.close()


async def test_the_global_cap_evicts_finished_streams_first() -> None:
    streams = Streams(ResumeConfig(max_total_bytes=20, max_stream_bytes=20))
    old = streams.open("a")
    await old.end([b"x" * 12])
    live = streams.open("a")
    await live.send([b"y" * 12])  # over 20 in all: the finished stream nobody follows goes
    assert streams.get(old.sid) is None and streams.get(live.sid) is live
    assert streams.total == 12
    await live.send([b"z" * 12])  # still over: the appending stream drops its oldest
    assert streams.total == 12 and live.base == 1
    await streams.close()
    assert streams.total == 0


async def test_the_stream_cap_refuses_new_resumable_streams() -> None:
    streams = Streams(ResumeConfig(max_streams=2))
    a, b = streams.open("a"), streams.open("a")
    with pytest.raises(KeelError) as info:
        streams.open("a")
    assert info.value.status == 503 and info.value.code == "resume_full"
    await a.end([])
    streams.open("a")  # a finished stream nobody follows makes room
    assert streams.get(a.sid) is None and streams.get(b.sid) is b
    with pytest.raises(KeelError) as dup:
        streams.open("a", b.sid)
    assert dup.value.code == "stream_id_in_use"
    await streams.close()


async def test_unfollowed_streams_expire_after_the_grace_and_followed_ones_do_not() -> None:
    streams = Streams(ResumeConfig(grace=0.05))
    buf = streams.open("a")
    buf.attach()
    await asyncio.sleep(0.1)
    assert streams.get(buf.sid) is buf  # followed: no timer
    buf.detach()
    loop = asyncio.get_running_loop()
    t = loop.time()
    while streams.get(buf.sid) is not None:
        assert loop.time() - t < 1
        await asyncio.sleep(0.005)
    assert 0.045 < loop.time() - t < 0.2
    assert buf.ended and buf.error is not None and buf.error.code == "stream_cancelled"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ks_abc:3", ("ks_abc", 3)), ("a:b:10", ("a:b", 10)), (" s:0 ", ("s", 0))],
)
def test_last_event_id(value, expected) -> None:
    assert parse_last_event_id(value) == expected


@pytest.mark.parametrize("value", ["", "nocolon", "s:", ":3", "s:-1", "s:x"])
def test_bad_last_event_ids_are_named(value) -> None:
    with pytest.raises(ValueError, match="is not"):
        parse_last_event_id(value)
