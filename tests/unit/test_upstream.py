"""gateway/upstream.py against a scripted engine on a real socket: what each connection carries, how an answer ends,
what is kept and what is closed."""

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

import pytest

from gateway import proxy, upstream
from tests.raw_engine import read_request

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# Far longer than anything here takes; reached only when something waits for what never comes.
LIMIT = 20.0


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


async def test_a_whole_body_larger_than_the_high_water_mark_is_read_to_its_end() -> None:
    """`read` takes the body only at its end: the socket paused at the high-water mark was never read again (a plain
    answer between 256 KiB and the proxy's 1 MiB whole-body limit hung until a timeout)."""
    body = bytes(range(256)) * 2400  # 600 KiB

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await reader.read()

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert await asyncio.wait_for(conn.read(), LIMIT) == body
        pool.release(conn)
        pool.close()


async def test_a_connection_kept_after_its_reader_paused_it_reads_the_next_answer() -> None:
    """A spliced answer whose client was backpressured as its last piece came: the engine's socket was paused and
    the answer complete in the same read. The kept connection must be read again, or its next answer never comes."""
    go = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await go.wait()
        writer.write(b"5\r\nhello\r\n0\r\n\r\n")  # the last piece and the end, in one segment
        while await read_request(reader):
            writer.write(OK)

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        conn.splice(lambda data: conn.pause_reading())  # a client whose buffer is full after every write
        go.set()
        while not conn.complete:
            await conn.wait()
        pool.release(conn)
        assert conn.transport is not None and conn.transport.is_reading()
        again = await asyncio.wait_for(pool.request(address, head(), b"{}"), LIMIT)
        assert again is conn and await again.read() == b"ok"
        pool.release(again)
        pool.close()


async def test_an_early_answer_while_the_upload_waits_on_the_engine_ends_the_upload_and_its_connection() -> None:
    """The engine answers before reading the body, then reads nothing more and keeps its connection: the upload
    waited for the engine's socket to drain forever, and a closed connection flushed its unsent bytes forever."""
    body = b"x" * (upstream.UPLOAD_PIECE * 256)  # 64 MiB: more than the sockets' buffers hold
    done = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await done.wait()

    engine = Engine(script)
    pool = upstream.Pool(5)
    try:
        async with engine.running() as address:
            conn = await asyncio.wait_for(pool.request(address, head(body), body), LIMIT)
            assert (conn.status, await conn.read()) == (413, b"big")
            assert not conn.reusable()
            lost = asyncio.Event()
            connection_lost = conn.connection_lost

            def noted(exc: Exception | None) -> None:
                connection_lost(exc)
                lost.set()

            conn.connection_lost = noted  # type: ignore[method-assign]
            pool.release(conn)
            await asyncio.wait_for(lost.wait(), LIMIT)
    finally:
        done.set()


async def test_a_body_delimited_by_the_close_but_cut_by_a_reset_is_an_error() -> None:
    """Only an orderly close ends a body without a length (RFC 9112 6.3): a reset is the engine breaking off."""
    got = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello")
        await got.wait()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: a reset
        writer.transport.abort()

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert await conn.readany() == b"hello"
        got.set()
        with pytest.raises(upstream.UpstreamError, match="before the end of its answer"):
            await asyncio.wait_for(conn.readany(), LIMIT)
        pool.release(conn)


async def test_bytes_after_a_complete_answer_are_not_taken_for_another_and_the_connection_is_dropped() -> None:
    """An engine that sends more than its answer (a wrong Content-Length, a second answer): what follows the answer
    must change nothing of it, and the connection is not kept (its parser would be mid-way in someone's answer)."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(OK + b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nbad")
        await reader.read()

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert (conn.status, conn.headers, await conn.read()) == (200, [(b"Content-Length", b"2")], b"ok")
        assert not conn.reusable()
        pool.release(conn)
        assert pool._take(address) is None


class Flow:
    """uvicorn's FlowControl for a client's socket (what `proxy._Request._splice` uses of it)."""

    def __init__(self) -> None:
        self.write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._writable.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._writable.set()


class QuickClient:
    """A client's socket whose buffer is full after every write and drained in the event loop's next callbacks:
    before the task that relays to it runs again."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.data = bytearray()
        self.wrote = asyncio.Event()

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.data += data
        self.flow.pause_writing()
        asyncio.get_running_loop().call_soon(self.flow.resume_writing)
        self.wrote.set()


async def test_a_spliced_body_reads_on_when_the_client_drained_before_the_relay_looked() -> None:
    """The client's buffer filled with a piece (the engine's socket paused) and drained before the relay's task ran:
    the relay saw no backpressure and waited for more without reading the engine's socket again (the request then
    ended as an engine that went silent)."""
    go = asyncio.Event()
    client = QuickClient(Flow())

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await go.wait()
        writer.write(b"5\r\nhello\r\n")
        await client.wrote.wait()  # the first piece reached the client: the rest comes in a read of its own
        writer.write(b"5\r\nworld\r\n0\r\n\r\n")
        await reader.read()

    engine = Engine(script)
    pool = upstream.Pool(5)
    request = SimpleNamespace(arrived=time.monotonic(), ttfb=None, last_read=0.0)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        splicing = asyncio.ensure_future(proxy._Request._splice(  # type: ignore[arg-type]
            request, conn, client, client.flow, asyncio.get_running_loop()))
        go.set()
        await asyncio.wait_for(splicing, LIMIT)
        assert client.data == b"5\r\nhello\r\n5\r\nworld\r\n"  # each piece as a chunk of the client's body
        assert request.ttfb is not None
        pool.release(conn)
        pool.close()


async def test_trailer_fields_are_not_headers() -> None:
    """A chunked answer's trailer fields come after its body; read in the same segment as its head they were added
    to the head the proxy relays: the client got them as headers (a trailer `Set-Cookie` as a cookie)."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nSet-Cookie: a=b\r\n\r\n")
        await reader.read()

    engine = Engine(script)
    pool = upstream.Pool(5)
    async with engine.running() as address:
        conn = await pool.request(address, head(), b"{}")
        assert conn.headers == [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Sum")]
        assert conn.content_length is None and await conn.read() == b"hello"
        pool.release(conn)
        pool.close()


async def test_a_pool_closed_at_shutdown_closes_what_comes_back_and_idle_ones_past_their_time() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while await read_request(reader):
            writer.write(OK)

    engine = Engine(script)
    pool = upstream.Pool(5, idle_timeout=60)
    async with engine.running() as address:
        first = await pool.request(address, head(), b"{}")
        second = await pool.request(address, head(), b"{}")  # the first is busy: a second connection
        assert await first.read() == await second.read() == b"ok"
        pool.release(first)
        first.idle_since -= 61  # kept longer than the idle timeout
        pool.release(second)  # the oldest idle ones past their time are closed as another comes back
        assert first.closed and not second.closed
        third = await pool.request(address, head(), b"{}")
        assert third is second and await third.read() == b"ok"
        pool.close()
        pool.release(third)  # after shutdown: closed, not kept
        assert third.closed and pool._take(address) is None
