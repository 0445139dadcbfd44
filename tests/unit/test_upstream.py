"""gateway/upstream.py against a scripted engine on a real socket: what each connection carries, how an answer ends,
what is kept and what is closed."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway import upstream

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length), b"" when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    return head + await reader.readexactly(length)


class Engine:
    """A server that runs `script` for each connection (with the connection's number) and remembers the requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # a connection ended from the client's side

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[upstream.Address]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield ("127.0.0.1", server.sockets[0].getsockname()[1], False)
        finally:
            server.close()


def head(body: bytes = b"{}") -> bytes:
    return upstream.request_head(b"/v1/chat/completions", b"engine", [(b"content-type", b"application/json")],
                                 len(body))


async def test_a_kept_connection_carries_the_next_request() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while request := await read_request(reader):
            engine.requests.append(request)
            writer.write(OK)

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        for _ in range(3):
            conn = await pool.request(address, head(), b"{}")
            assert (conn.status, await conn.read()) == (200, b"ok")
            pool.release(conn)
        pool.close()
    assert engine.connections == 1 and len(engine.requests) == 3
    assert engine.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\n")


async def test_a_kept_connection_the_engine_closed_as_the_request_came_is_replaced_once() -> None:
    """An engine's keep-alive timeout racing a request: it closes the kept connection without answering. The request
    goes once more on a new connection; a new connection closed the same way is the engine's failure."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        request = await read_request(reader)
        engine.requests.append(request)
        if number == 1:
            writer.write(OK)
            await read_request(reader)  # the second request on this connection: closed unanswered
        elif number == 2:
            writer.write(OK)
        # number 3 closes at once

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert await conn.read() == b"ok"
        pool.release(conn)
        conn = await pool.request(address, head(), b"{}")  # on the kept one, closed: again on connection 2
        assert (conn.status, await conn.read()) == (200, b"ok")
        pool.release(conn)
        assert engine.connections == 2
        pool.close()
        with pytest.raises(upstream.UpstreamError, match="closed the connection"):
            await pool.request(address, head(), b"{}")  # a new connection (3), closed: no second try
    assert engine.connections == 3


async def test_a_body_without_length_ends_when_the_engine_closes_and_the_connection_is_not_kept() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, ")
        await writer.drain()
        writer.write(b"world")

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert conn.content_length is None
        assert await conn.read() == b"hello, world"
        assert not conn.reusable()
        pool.release(conn)
        assert pool._take(address) is None


async def test_a_chunked_body_cut_short_is_an_error_not_an_end() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert await conn.readany() == b"hello"
        with pytest.raises(upstream.UpstreamError, match="before the end of its answer"):
            await conn.readany()
        pool.release(conn)


async def test_interim_answers_are_skipped() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert conn.status == 200 and conn.headers == [(b"Content-Length", b"2")]
        assert await conn.read() == b"ok"
        pool.release(conn)


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"])
async def test_an_answer_that_is_not_valid_http_is_an_error_and_the_connection_closed(answer: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(answer)
        await reader.read()  # until the client closes

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        with pytest.raises(upstream.UpstreamError, match="not valid HTTP"):
            await pool.request(address, head(), b"{}")
        assert pool._take(address) is None


async def test_a_reader_that_lags_pauses_the_engines_socket_and_gets_every_byte_in_order() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB
    sent = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 65536):
            writer.write(body[start:start + 65536])
            await writer.drain()
        sent.set()

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        while not conn._reading_paused:  # nobody reads: the buffer fills to the high-water mark
            await asyncio.sleep(0)
        # Held: at most the high-water mark and what one read of the socket brings (uvloop: up to 256 KiB).
        assert conn._size <= upstream.HIGH_WATER + 256 * 1024
        received = bytearray()
        while piece := await conn.readany():
            received += piece
        assert received == body and sent.is_set()
        pool.release(conn)


async def test_an_abandoned_answer_closes_its_connection() -> None:
    """A client that left mid-stream: the engine must see its connection end (it stops generating)."""
    engine_saw_the_end = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert await reader.read() == b""
        engine_saw_the_end.set()

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        reading = asyncio.ensure_future(conn.readany())
        assert await reading == b"hello"
        reading = asyncio.ensure_future(conn.readany())
        await asyncio.sleep(0)
        reading.cancel()
        pool.release(conn)
        await asyncio.wait_for(engine_saw_the_end.wait(), 10)
        assert pool._take(address) is None


async def test_a_spliced_body_is_one_write_per_read_of_the_engines_socket() -> None:
    go, more = asyncio.Event(), asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await go.wait()
        writer.write(b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n")  # three chunks in one segment
        await writer.drain()
        await more.wait()
        writer.write(b"1\r\nd\r\n0\r\n\r\n")

    engine = Engine(script)
    pool = upstream.Pool(5)
    writes: list[bytes] = []
    wrote = asyncio.Event()

    def sink(data: bytes) -> None:
        writes.append(data)
        wrote.set()

    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        conn.splice(sink)
        go.set()
        await wrote.wait()
        assert writes == [b"abc"]
        more.set()
        while not conn.complete:
            await conn.wait()
        assert writes == [b"abc", b"d"]
        pool.release(conn)


async def test_an_early_answer_to_an_upload_stops_it_and_the_connection_is_not_kept() -> None:
    body = b"x" * (upstream.UPLOAD_PIECE * 64)  # 16 MiB

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await reader.read(65536)  # some of the body, then the engine closes

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(body), body)
        assert (conn.status, await conn.read()) == (413, b"big")
        assert not conn.reusable()
        pool.release(conn)


async def test_an_engine_that_is_not_there_is_an_upstream_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        pass

    async with Engine(script).running() as address:  # a free port: the server is closed after this block
        pass
    with pytest.raises(upstream.UpstreamError, match=r"cannot connect to 127\.0\.0\.1"):
        await upstream.Pool(5).request(address, head(), b"{}")
