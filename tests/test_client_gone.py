"""A client that leaves mid-stream is normal: keel stops quietly (no "Error handling request"
traceback in the log), while a write error with the client still connected is not hidden."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import orjson
import pytest
from aiohttp.client_exceptions import ClientConnectionResetError

from keel.engine._sinks import ClientGone
from keel.gateway._sink import SSESink
from keel.testing import SimProcess, spawn_gateway


class _Transport:
    def __init__(self, closing: bool) -> None:
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing


class _Request:
    def __init__(self, transport: _Transport | None) -> None:
        self.transport = transport


class _Response:
    async def write(self, data: bytes) -> None:
        raise ClientConnectionResetError("Cannot write to closing transport")

    async def write_eof(self, data: bytes = b"") -> None:  # (the last chunks come with it)
        raise ClientConnectionResetError("Cannot write to closing transport")


def _relay(transport: _Transport | None) -> SSESink:
    relay = SSESink(_Request(transport), "rid")  # type: ignore[arg-type]
    relay.response = _Response()  # type: ignore[assignment]
    relay.committed = True
    return relay


@pytest.mark.parametrize("transport", [None, _Transport(closing=True)], ids=["lost", "closing"])
async def test_a_write_to_a_client_that_left_is_client_gone(transport: _Transport | None) -> None:
    # send() is aiohttp's write itself (no coroutine of the sink's per read): its error comes
    # out as it is, and the door (chat_completions) asks the sink whether the client left.
    relay = _relay(transport)
    with pytest.raises(ClientConnectionResetError):
        await relay.send([b"{}"])
    assert relay.left
    with pytest.raises(ClientGone):
        await _relay(transport).end([])


async def test_a_write_error_with_the_client_still_there_is_not_hidden() -> None:
    relay = _relay(_Transport(closing=False))
    with pytest.raises(ClientConnectionResetError):
        await relay.send([b"{}"])
    assert not relay.left
    with pytest.raises(ClientConnectionResetError):
        await _relay(_Transport(closing=False)).end([])


async def _leave_mid_stream(port: int, body: bytes, reads: int, reset: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: keel\r\n"
        f"content-type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    for _ in range(reads):
        if not await reader.read(65536):
            break
    if reset:  # an abortive close (RST), like a killed client process
        sock: socket.socket = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def test_clients_leaving_mid_stream_log_no_traceback(
    sims: tuple[SimProcess, SimProcess], tmp_path: Any
) -> None:
    """Clients leave at random points of fast streams (a frame every 0.5 ms, so keel is often
    writing when the connection goes); the gateway's log shows no error for any of them."""
    a, _ = sims
    cfg = {"models": {"m": {"deployments": [{"base_url": a.base_url, "api_key": "k"}]}}}
    prompt = "gone [[sim:len=3000,delay=0.0005]]"
    body = orjson.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    )
    with spawn_gateway(cfg, "--log-level", "info", workdir=str(tmp_path)) as gw:
        port = int(gw.base_url.rsplit(":", 1)[1].split("/")[0])
        for i in range(40):
            await _leave_mid_stream(port, body, 1 + i % 5, reset=i % 2 == 0)
        await asyncio.sleep(0.5)
        out = gw.output_tail()
    assert "Error handling request" not in out
    assert "Traceback" not in out
