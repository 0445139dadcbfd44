"""The first byte of a stream is relayed as soon as the engine sends it (issue 20).

Time to first token is the figure a chat user feels. These tests need no clock: the stand-in engine sends a piece
and then waits until the client, through the gateway, has received it. A gateway that held anything back (waited for
more bytes, for the body's end, for a buffer to fill, for a timer) would leave the engine waiting and the test
failing at its time limit; a fast gateway and a slow one pass alike, which is what a timed test would not promise.
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from gateway import proxy
from tests.harness import run_gateway, serve_app, write_models

CHAT = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "stream": True}
# Far longer than any relay takes; reached only when the gateway holds a piece back.
LIMIT = 20.0


def _engine(pieces: list[bytes], received: asyncio.Queue[int], headers_seen: asyncio.Event,
            finished: asyncio.Event) -> web.Application:
    """An engine that sends its headers, then each piece only once the client has said it received the one before."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)  # the status line and headers, with nothing of the body
        await asyncio.wait_for(headers_seen.wait(), LIMIT)
        for index, piece in enumerate(pieces):
            await resp.write(piece)
            assert await asyncio.wait_for(received.get(), LIMIT) == index
        await resp.write_eof()
        finished.set()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


async def _read_each_piece(chunks: AsyncIterator[bytes], pieces: list[bytes], received: asyncio.Queue[int]) -> None:
    """Read each piece whole (as sent, nothing more), then tell the engine it may send the next."""
    for index, piece in enumerate(pieces):
        got = b""
        while len(got) < len(piece):
            got += await asyncio.wait_for(anext(chunks), LIMIT)
        assert got == piece, (index, got)
        received.put_nowait(index)


@pytest.mark.parametrize("http", ["httptools", "h11"])  # spliced to the client's socket; relayed through ASGI
async def test_headers_and_each_piece_reach_the_client_before_the_engine_sends_more(tmp_path: Path, http: str) -> None:
    # A role chunk, one token of a single byte (the smallest write an engine makes), a token split inside its
    # event, then [DONE]: each must come through alone, as it was sent.
    pieces = [b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n', b"d", b'ata: {"choices":[]}\n\n',
              b"data: [DONE]\n\n"]
    received: asyncio.Queue[int] = asyncio.Queue()
    headers_seen, finished = asyncio.Event(), asyncio.Event()
    async with serve_app(_engine(pieces, received, headers_seen, finished)) as port:
        models = write_models(tmp_path, {"name": "remote", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models, http=http) as gw, httpx.AsyncClient(timeout=LIMIT) as client:
            async with client.stream("POST", gw.v1 + "/chat/completions", json=CHAT) as resp:
                # The engine's status and headers arrived while it sends nothing more.
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                headers_seen.set()
                chunks = resp.aiter_raw()
                await _read_each_piece(chunks, pieces, received)
                assert [chunk async for chunk in chunks] == []
            await asyncio.wait_for(finished.wait(), LIMIT)


async def test_the_first_byte_is_relayed_at_once_while_the_disconnect_watch_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's prefill: headers, then nothing until the client has them, then the first token. The gateway's
    disconnect watch (started `_WATCH_AFTER` after the request; at once here) reads from the client meanwhile, and
    the token is still not held back."""
    monkeypatch.setattr(proxy, "_WATCH_AFTER", 0.0)
    pieces = [b'data: {"choices":[{"delta":{"content":"first"}}]}\n\n', b"data: [DONE]\n\n"]
    received: asyncio.Queue[int] = asyncio.Queue()
    headers_seen, finished = asyncio.Event(), asyncio.Event()
    async with serve_app(_engine(pieces, received, headers_seen, finished)) as port:
        models = write_models(tmp_path, {"name": "remote", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models) as gw, httpx.AsyncClient(timeout=LIMIT) as client:
            async with client.stream("POST", gw.v1 + "/chat/completions", json=CHAT) as resp:
                assert resp.status_code == 200
                headers_seen.set()
                await _read_each_piece(resp.aiter_raw(), pieces, received)
            await asyncio.wait_for(finished.wait(), LIMIT)
