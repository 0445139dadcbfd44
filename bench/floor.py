#!/usr/bin/env python3
"""The floor of the gateway's stack: the smallest uvicorn (httptools, uvloop) + aiohttp reverse proxy.

No auth, no metrics, no routing, no lifecycle, no error mapping, no disconnect handling: it forwards
every POST to one upstream with one pooled aiohttp session and relays the answer chunk by chunk. What
sparkgate adds over this is its own work; what this adds over nginx is the Python stack's.

With --raw the upstream client is not aiohttp but ~60 lines of asyncio.Protocol + httptools' response
parser with a keep-alive pool (no timeouts, no retries, no error handling: an experiment, not a client):
what a hand-written upstream client could win over aiohttp on the same server.

    .venv/bin/python bench/floor.py --port 18300 --upstream http://127.0.0.1:18200 [--raw]
    .venv/bin/python bench/proxy.py --floor        # compare.py with floor.py and floor.py --raw beside sparkgate
"""
from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httptools
import uvicorn

Message = MutableMapping[str, Any]
_SKIP = {b"host", b"content-length", b"connection", b"transfer-encoding", b"authorization"}


def make_app(upstream: str) -> Callable[..., Awaitable[None]]:
    session: aiohttp.ClientSession | None = None

    async def app(scope: Message, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            assert session is not None
            await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert session is not None
        body = await _body(receive)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in _SKIP]
        async with session.request(scope["method"], upstream + scope["path"], data=body, headers=headers) as resp:
            out = [(k, v) for k, v in resp.raw_headers if k.lower() not in (b"connection", b"transfer-encoding")]
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


class _Conn(asyncio.Protocol):
    """One keep-alive upstream connection; one response at a time."""

    def __init__(self, pool: list[_Conn]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.head: asyncio.Future[int] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.complete = True
        if self in self.pool:
            self.pool.remove(self)
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.head is not None
        self.head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked here: once the parser returns it has reset for the next message (asked after, it said no, and every
        # request opened a new connection: what made the first measurements of --raw slow).
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def request(self, raw: bytes) -> int:
        self.headers, self.chunks, self.complete = [], [], False
        self.head = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(raw)
        return await self.head

    async def read(self) -> bytes:
        """What has arrived since the last read; b"" once the response is complete."""
        while not self.chunks and not self.complete:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        chunks, self.chunks = self.chunks, []
        return b"".join(chunks)


async def _body(receive: Callable[[], Awaitable[Message]]) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _request(scope: Message, receive: Callable[[], Awaitable[Message]], host: str, port: int,
                   idle: list[_Conn], factory: Callable[[], _Conn]) -> tuple[_Conn, int, list[tuple[bytes, bytes]]]:
    """The request's body read and sent on a kept connection (or a new one from `factory`): the connection, the
    answer's status and the headers to send on."""
    body = await _body(receive)
    head = [f"{scope['method']} {scope['path']} HTTP/1.1\r\nhost: {host}:{port}\r\n".encode()]
    head += [k + b": " + v + b"\r\n" for k, v in scope["headers"] if k not in _SKIP]
    head.append(b"content-length: %d\r\n\r\n" % len(body))
    if idle:
        conn = idle.pop()
    else:
        _, conn = await asyncio.get_running_loop().create_connection(factory, host, port)
    status = await conn.request(b"".join(head) + body)
    out = [(k, v) for k, v in conn.headers if k.lower() not in (b"connection", b"transfer-encoding")]
    return conn, status, out


def _done(conn: _Conn, idle: list[_Conn]) -> None:
    if conn.keep_alive and conn.transport is not None and not conn.transport.is_closing():
        idle.append(conn)
    elif conn.transport is not None:
        conn.transport.close()


async def _lifespan(receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


def make_raw_app(upstream: str, splice: bool = False) -> Callable[..., Awaitable[None]]:
    """`--raw`: the hand-written client, its body sent on through ASGI; `--splice`: written to uvicorn's transport."""
    url = urlsplit(upstream)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    idle: list[_Conn] = []
    factory = (lambda: _SpliceConn(idle)) if splice else (lambda: _Conn(idle))

    async def app(scope: Message, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        conn, status, out = await _request(scope, receive, host, port, idle, factory)
        if isinstance(conn, _SpliceConn):
            await _splice(conn, status, out, idle, send)
            return
        await send({"type": "http.response.start", "status": status, "headers": out})
        while chunk := await conn.read():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        _done(conn, idle)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


class _SpliceConn(_Conn):
    """A raw upstream connection whose body bytes go to the client's transport from the parser's callback (no task
    wake per chunk, no ASGI message): what relaying costs without aiohttp's StreamReader and uvicorn's send."""

    def __init__(self, pool: list[_Conn]) -> None:
        super().__init__(pool)
        self.sink: asyncio.Transport | None = None

    def on_body(self, body: bytes) -> None:
        if self.sink is None:
            self.chunks.append(body)
        else:
            self.sink.write(b"%x\r\n%b\r\n" % (len(body), body))


async def _splice(conn: _SpliceConn, status: int, out: list[tuple[bytes, bytes]], idle: list[_Conn],
                  send: Callable[[Message], Awaitable[None]]) -> None:
    """The answer through uvicorn's transport: a plain one whole through ASGI, a chunked one written from the
    parser's callback."""
    await send({"type": "http.response.start", "status": status, "headers": out})
    if any(k.lower() == b"content-length" for k, _ in conn.headers):  # a plain answer: whole, through ASGI
        while not conn.complete:
            conn.waiter = asyncio.get_running_loop().create_future()
            await conn.waiter
        pending, conn.chunks = b"".join(conn.chunks), []
        _done(conn, idle)
        await send({"type": "http.response.body", "body": pending, "more_body": False})
        return
    sink = send.__self__.transport  # type: ignore[attr-defined]  # uvicorn's RequestResponseCycle
    if conn.chunks:
        pending, conn.chunks = b"".join(conn.chunks), []
        sink.write(b"%x\r\n%b\r\n" % (len(pending), pending))
    if not conn.complete:
        conn.sink = sink
        conn.waiter = asyncio.get_running_loop().create_future()
        await conn.waiter
    conn.sink = None
    _done(conn, idle)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--upstream", default="http://127.0.0.1:18200")
    ap.add_argument("--raw", action="store_true", help="asyncio.Protocol + httptools upstream instead of aiohttp")
    ap.add_argument("--splice", action="store_true",
                    help="as --raw, the body written to uvicorn's transport from the upstream parser's callback")
    ap.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn",
                    help="granian: its ASGI interface, one worker, uvloop (pip install granian)")
    a = ap.parse_args()
    if a.server == "granian":
        from granian.constants import Interfaces, Loops
        from granian.server import Server
        os.environ["FLOOR_UPSTREAM"] = a.upstream
        os.environ["FLOOR_KIND"] = "raw" if a.raw else "aiohttp"
        Server("bench.floor:from_environ", address="127.0.0.1", port=a.port, interface=Interfaces.ASGI,
               loop=Loops.uvloop, workers=1, log_enabled=False, factory=True).serve()
        return
    app = make_raw_app(a.upstream, splice=a.splice) if a.raw or a.splice else make_app(a.upstream)
    uvicorn.run(app, host="127.0.0.1", port=a.port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")


def from_environ() -> Callable[..., Awaitable[None]]:
    """The app for granian's worker (it imports the app by name): FLOOR_UPSTREAM and FLOOR_KIND say which."""
    upstream = os.environ["FLOOR_UPSTREAM"]
    return (make_raw_app if os.environ.get("FLOOR_KIND") == "raw" else make_app)(upstream)


if __name__ == "__main__":
    main()
