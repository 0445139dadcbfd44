"""The proxy's own client for engines (gateway/upstream.py) and its relay (gateway/proxy.py `_relay`, `_splice`)
against an engine that misbehaves on a raw socket and a client that leaves: a stream broken off ends with an error
event, a plain answer broken off is cut for the client too, a client or a time limit that ends a request ends the
engine's connection, and answers of every size pass whole. Each under uvicorn's httptools protocol (the body spliced
to the client's socket) and its h11 one (the body relayed through ASGI's send)."""

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.harness import run_gateway, write_models
from tests.raw_engine import read_request

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
# Far longer than anything here takes; reached only when something waits for what never comes.
LIMIT = 20.0
HTTP = ["httptools", "h11"]
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
EVENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Engine:
    """An engine on a raw socket: `script` runs for each connection the gateway opens."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.ended = asyncio.Event()  # the gateway ended a connection while the script waited for it

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def until_the_gateway_leaves(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self.ended.set()

    @contextlib.asynccontextmanager
    async def models(self, directory: Path) -> AsyncIterator[Path]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield write_models(directory, {"name": "m", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        finally:
            server.close()


def last_event(body: bytes) -> bytes:
    return body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]


@pytest.mark.parametrize("http", HTTP)
async def test_a_plain_answer_over_the_high_water_mark_and_under_the_whole_body_limit_passes_whole(
        tmp_path: Path, http: str) -> None:
    """600 KiB with a Content-Length: read whole, then sent in one message (it hung: the engine's socket was paused
    at upstream.HIGH_WATER and never read again)."""
    body = json.dumps({"id": "x", "object": "chat.completion", "pad": "x" * 600_000}).encode()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(body), body))

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http) as gw, \
            httpx.AsyncClient(timeout=LIMIT) as client:
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})
    assert (resp.status_code, resp.content) == (200, body)


@pytest.mark.parametrize("http", HTTP)
@pytest.mark.parametrize("path", ["/chat/completions", "/messages"])
async def test_a_stream_the_engine_breaks_off_ends_with_an_error_event(tmp_path: Path, http: str, path: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(EVENT))  # then the connection ends without the body's last chunk

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http) as gw, \
            httpx.AsyncClient(timeout=LIMIT) as client:
        async with client.stream("POST", gw.v1 + path, json={"model": "m", "messages": [], "stream": True}) as resp:
            assert resp.status_code == 200
            body = b"".join([piece async for piece in resp.aiter_raw()])  # a whole body: no protocol error
    assert body.startswith(EVENT)
    event = last_event(body)
    if path == "/messages":  # Anthropic's shape: its SDKs raise on an `error` event
        assert event.startswith(b"event: error\ndata: ")
        assert json.loads(event.split(b"data: ", 1)[1])["type"] == "error"
    else:
        assert json.loads(event.removeprefix(b"data: "))["error"]["code"] == "bad_gateway"


@pytest.mark.parametrize("http", HTTP)
@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b'{"id": "x"'),
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"id": "x"',
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n" + b'{"id": "x"',
], ids=["chunked", "small", "large"])
async def test_a_plain_answer_the_engine_breaks_off_is_cut_for_the_client_never_a_shorter_success(
        tmp_path: Path, http: str, answer: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http) as gw, \
            httpx.AsyncClient(timeout=LIMIT) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})


@pytest.mark.parametrize("http", HTTP)
async def test_a_client_that_leaves_mid_stream_ends_the_engines_connection(tmp_path: Path, http: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(EVENT))
        await engine.until_the_gateway_leaves(reader)

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http) as gw:
        async with httpx.AsyncClient(timeout=LIMIT) as client, \
                client.stream("POST", gw.v1 + "/chat/completions",
                              json={"model": "m", "messages": [], "stream": True}) as resp:
            got = b""
            async for piece in resp.aiter_raw():
                got += piece
                if len(got) >= len(EVENT):
                    break
        assert got == EVENT
        await asyncio.wait_for(engine.ended.wait(), LIMIT)  # the client left: so did the gateway


@pytest.mark.parametrize("http", HTTP)
async def test_the_request_timeout_mid_stream_ends_it_with_an_error_event_and_the_engines_connection(
        tmp_path: Path, http: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(EVENT))  # then nothing: the time limit ends it
        await engine.until_the_gateway_leaves(reader)

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http, request_timeout=0.5) as gw, \
            httpx.AsyncClient(timeout=LIMIT) as client:
        async with client.stream("POST", gw.v1 + "/chat/completions",
                                 json={"model": "m", "messages": [], "stream": True}) as resp:
            body = b"".join([piece async for piece in resp.aiter_raw()])
        await asyncio.wait_for(engine.ended.wait(), LIMIT)
    assert body.startswith(EVENT)
    assert json.loads(last_event(body).removeprefix(b"data: "))["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("http", HTTP)
async def test_answers_one_after_another_share_one_engine_connection_and_a_broken_one_is_not_kept(
        tmp_path: Path, http: str) -> None:
    def plain(n: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"n\": %d}" % n

    answers = [plain(0), plain(1), plain(2), STREAM_HEAD + chunk(EVENT) + b"0\r\n\r\n",  # whole answers
               STREAM_HEAD + chunk(EVENT), plain(9)]  # a stream broken off, then one on a new connection
    given = iter(answers)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            answer = next(given)
            writer.write(answer)
            if not answer.endswith((b"}", b"0\r\n\r\n")):
                return  # broken off: the connection ends

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http) as gw, \
            httpx.AsyncClient(timeout=LIMIT) as client:
        numbers = [(await client.post(gw.v1 + "/chat/completions", json={"model": "m"})).json()["n"] for _ in range(3)]
        streams = [(await client.post(gw.v1 + "/chat/completions", json={"model": "m", "stream": True})).content
                   for _ in range(2)]
        last = await client.post(gw.v1 + "/chat/completions", json={"model": "m"})
    assert numbers == [0, 1, 2] and streams[0] == EVENT and streams[1].startswith(EVENT + b"data: {\"error\"")
    assert last.json() == {"n": 9} and engine.connections == 2


@pytest.mark.parametrize("http", HTTP)
async def test_hop_by_hop_headers_and_those_connection_lists_stay_on_their_hop_both_ways(
        tmp_path: Path, http: str) -> None:
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            heads.append(request.split(b"\r\n\r\n", 1)[0].lower())
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n"
                         b"Proxy-Connection: keep-alive\r\nTrailer: X-Sum\r\nX-Kept: 1\r\n"
                         b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk(EVENT) + b"0\r\nX-Sum: 1\r\n\r\n")

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http) as gw, \
            httpx.AsyncClient(timeout=LIMIT) as client:
        resp = await client.post(gw.v1 + "/chat/completions?x=1", json={"model": "m", "stream": True}, headers={
            "Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "300", "TE": "trailers",
            "Proxy-Authorization": "Basic eDp4", "X-Api-Key": "k", "X-Client": "1"})
    assert (resp.status_code, resp.content) == (200, EVENT)
    names = {name.lower() for name in resp.headers}
    assert "x-kept" in names and names & {"x-hop", "keep-alive", "proxy-connection", "trailer", "x-sum"} == set()
    lines = heads[0].split(b"\r\n")
    assert lines[0] == b"post /v1/chat/completions?x=1 http/1.1" and b"x-client: 1" in lines
    sent = {line.split(b":", 1)[0] for line in lines[1:]}
    assert sent & {b"x-private", b"keep-alive", b"te", b"proxy-authorization", b"x-api-key", b"connection"} == set()


@pytest.mark.parametrize("http", HTTP)
async def test_a_client_that_stops_reading_then_leaves_ends_the_engines_connection(tmp_path: Path, http: str) -> None:
    """The engine streams on while the client reads nothing: the gateway waits for the client's socket to drain
    (the engine's is not read meanwhile), and when the client leaves instead, the engine's connection ends."""
    event = b"data: " + b"x" * 16384 + b"\n\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD)
        watching = asyncio.ensure_future(engine.until_the_gateway_leaves(reader))
        try:
            while not watching.done():
                writer.write(chunk(event))
                await writer.drain()
        finally:
            await watching

    engine = Engine(script)
    async with engine.models(tmp_path) as models, run_gateway(models, http=http) as gw:
        loop = asyncio.get_running_loop()
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
            await loop.sock_sendall(sock, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                                    b"application/json\r\nContent-Length: %d\r\n\r\n%b" % (port, len(body), body))
            async with asyncio.timeout(LIMIT):  # the gateway waits on this client, which reads nothing
                while not any(conn.flow.write_paused for conn in gw.server.server_state.connections):
                    await asyncio.sleep(0.01)
        await asyncio.wait_for(engine.ended.wait(), LIMIT)  # the client left: so did the gateway
