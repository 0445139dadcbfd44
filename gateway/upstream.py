"""The proxy's HTTP/1.1 client for engines: keep-alive connections of `asyncio.Protocol` with httptools' parser.

Why not aiohttp on this path (it stays for services, engine routes and health checks): per request aiohttp builds a
ClientRequest, a ClientResponse, a StreamReader, header multidicts and timer contexts, and writes the body from a
task; per streamed chunk its parser calls three Python methods and the reading task is woken once more before the
chunk can be sent on. Here a request is one write of bytes the proxy built, and a response is the parser's callbacks
on one object: its body is buffered for `read`/`readany`, or handed on from the callback to a `sink` (`splice`), so
that a token reaches the client's socket in the turn of the event loop that read it from the engine's. What it cost
and won: bench/RESULTS.md, issue 20.

What it does: one pool of idle connections per engine address (host, port, TLS), last used first, kept `idle_timeout`
seconds; a connection goes back only after a complete response the engine allows to keep (`should_keep_alive`),
never after an error or a cancellation (the engine then sees its client leave and stops generating). A request on a
kept connection that the engine closed meanwhile (an engine's keep-alive timeout racing the request) is sent once
more on a new connection, when nothing of an answer had come: a closed idle connection had not taken the request.
The engine's body is held up to `HIGH_WATER` bytes while its reader lags, then the socket is not read until the
reader has taken it (the engine's own send blocks: backpressure end to end); `read`, which takes the body only at its
end, is never paused. Interim 1xx answers are skipped; trailer fields are not headers; bytes after a whole answer
change nothing of it and the connection is not kept. A body that neither Content-Length nor chunked encoding delimits
ends when the engine closes (RFC 9112 6.3), not when it resets the connection. Guarded by tests/unit/test_upstream.py
and tests/integration/test_upstream_hostile.py.
"""

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

import httptools

# Body bytes held for a lagging reader past which the engine's socket is paused, and under which it is read again.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# A request body is written in pieces of this size, each after the previous ones have left (no second copy of an
# upload in the transport's buffer).
UPLOAD_PIECE = 256 * 1024

Address = tuple[str, int, bool]  # host, port, TLS
Sink = Callable[[bytes], None]


class UpstreamError(Exception):
    """The engine's connection failed: refused, reset, closed before the whole answer, or not HTTP."""


class Connection(asyncio.Protocol):
    """One connection to an engine, one request at a time; after `Pool.request`, the answer's head is known and its
    body comes through `read`, `readany` or `splice`."""

    def __init__(self, pool: "Pool", address: Address) -> None:
        self._pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.idle_since = 0.0
        # The transport's state, which outlives an answer: reading paused by a lagging reader, writing by the kernel.
        self._reading_paused = False
        self._writing_paused = False
        self._reset()

    def _reset(self) -> None:
        self.busy = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self._chunked = False
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.received = False  # any byte of an answer arrived
        self.received_at = 0.0  # loop time of the last bytes from the engine
        self._interim = False
        self._buffer: list[bytes] = []
        self._size = 0
        self._whole = False  # `read` takes the body at its end: never paused at the high-water mark meanwhile
        self._waiter: asyncio.Future[None] | None = None
        self._notified = False
        self._sink: Sink | None = None
        self._spliced: list[bytes] = []  # what one read of the engine's socket brought, for the sink
        self._drain: asyncio.Future[None] | None = None
        self._body_cut = False  # the request's body was not sent whole: the connection can't carry another

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.busy and not self.complete:
            if exc is None and self.head_done and self.content_length is None and not self._chunked \
                    and not self._interim:
                self.complete = True  # a body delimited by the close (RFC 9112 6.3, item 8); a reset is no end
            elif self.error is None:
                reason = f": {exc}" if exc else ""
                self.error = UpstreamError(f"the engine closed the connection before the end of its answer{reason}"
                                           if self.head_done else f"the engine closed the connection{reason}")
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: the connection can't be trusted again
            self.close()
            return
        self.received = True
        self.received_at = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the engine's answer is not valid HTTP/1.1 ({exc})")
        except httptools.HttpParserUpgrade:
            self._fail("the engine switched protocols")
        if self._spliced and self._sink is not None:
            # One write for what one read brought: an engine that sent a burst costs one send, as a buffered read
            # would; one that sends a token at a time, one send per token, at once.
            spliced, self._spliced = self._spliced, []
            self._sink(spliced[0] if len(spliced) == 1 else b"".join(spliced))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the whole answer: no answer to anything sent; the connection is not kept
            raise UpstreamError("the engine sent more than its answer")
        self.headers = []
        self.content_length = None
        self._chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:  # a trailer field, after a chunked body: never one of the head's (RFC 9110 6.5.1)
            return
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            self.content_length = int(value)  # the parser has refused a value that is not a number
        elif lower == b"transfer-encoding" and b"chunked" in value.lower():
            self._chunked = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints...): the real one follows
            self._interim = True
            return
        self.status = status
        self.head_done = True
        if self._chunked:
            self.content_length = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # an early answer to an upload: `send` stops, though the engine reads no more
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._spliced.append(body)
            return
        self._buffer.append(body)
        self._size += len(body)
        if self._size > HIGH_WATER and not self._reading_paused and not self._whole and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # The proxy's side

    async def send(self, head: bytes, body: bytes | bytearray | memoryview) -> None:
        """Write the request (its head as built by the caller, then its body) and wait for the answer's head."""
        assert self.transport is not None
        self.busy = True  # the answer's state is fresh: a new connection's, or cleared by `rest`
        transport = self.transport
        if len(body) <= UPLOAD_PIECE:
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            view = memoryview(body)
            for start in range(0, len(view), UPLOAD_PIECE):
                if self.closed or self.head_done:  # the engine answered (or left) before taking the whole body
                    self._body_cut = True
                    break
                transport.write(view[start:start + UPLOAD_PIECE])
                if self._writing_paused:
                    self._drain = self._loop.create_future()
                    await self._drain
        while not self.head_done:
            await self._wait()

    async def _wait(self) -> None:
        """Until something happens: the head, body bytes, the end, an error, or a `notify`."""
        if self.error is not None:
            raise self.error
        if self._notified:
            self._notified = False
            return
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error
        self._notified = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        else:
            self._notified = True

    def notify(self) -> None:
        """Wake whoever waits in `wait` (a sink that found its client's buffer full)."""
        self._wake()

    async def read(self) -> bytes:
        """The whole body (held whole: nobody would take part of it before its end to resume a paused socket)."""
        self._whole = True
        while not self.complete:
            self._resume_reading()
            await self._wait()
        return self._take()

    async def readany(self) -> bytes:
        """The body bytes that have arrived, waiting for some if none have; b"" at its end."""
        while not self._buffer:
            if self.complete:
                return b""
            await self._wait()
        return self._take()

    def _take(self) -> bytes:
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer = []
        self._size = 0
        self._resume_reading()
        return data

    def _resume_reading(self) -> None:
        if self._reading_paused and (self._size < LOW_WATER or self._whole) and not self.closed \
                and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def splice(self, sink: Sink) -> None:
        """From now on each piece of the body goes to `sink` from the parser's callback; what was held goes first."""
        if self._buffer:
            sink(self._take())
        self._sink = sink

    async def wait(self) -> None:
        """While spliced: until the body has ended (or failed: raises) or someone called `notify`."""
        if not self.complete:
            await self._wait()

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._resume_reading()

    def _fail(self, message: str) -> None:
        if self.error is None and not self.complete:  # a whole answer stands: what came after it costs the connection
            self.error = UpstreamError(message)
        self.close()
        self._wake()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # unsent bytes of a request: close() would wait for an engine that reads no more
            else:
                self.transport.close()
        self.closed = True
        self._pool.forget(self)

    def rest(self, now: float) -> None:
        """Kept for another request: the answer's state cleared, and the socket read again if the answer's last
        reader paused it as the answer ended (else the next answer would never be read)."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._reset()
        self.idle_since = now

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.closed and self.error is None and not self._body_cut
                and self.transport is not None and not self.transport.is_closing())


class Pool:
    """Connections to engines, by address; idle ones kept `idle_timeout` seconds, last used first."""

    def __init__(self, connect_timeout: float | None, idle_timeout: float = 60.0, max_idle: int = 512) -> None:
        self._connect_timeout = connect_timeout or None
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._idle: dict[Address, list[Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False  # the gateway stops: what comes back is closed, not kept

    async def request(self, address: Address, head: bytes, body: bytes | bytearray | memoryview) -> Connection:
        """Send the request on a kept connection to `address`, or a new one; the connection, with the answer's head.

        The caller owns it until it calls `release` (always: also on an error or a cancellation). Raises
        TimeoutError when connecting took longer than the connect timeout, UpstreamError when the engine could not
        be reached or its answer is broken."""
        conn = self._take(address)
        if conn is not None:
            try:
                await conn.send(head, body)
                return conn
            except UpstreamError:
                if conn.received:  # an answer had begun: the engine took the request
                    raise
            except BaseException:
                self.release(conn)
                raise
            conn.close()  # closed while idle, as we sent: once more, on a new connection
        conn = await self._connect(address)
        try:
            await conn.send(head, body)
        except BaseException:
            self.release(conn)
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """The connection back to the pool if its answer is complete and the engine keeps it, else closed."""
        if not conn.reusable() or self._closed:
            conn.close()
            return
        now = time.monotonic()
        conn.rest(now)
        idle = self._idle.get(conn.address, [])
        # The oldest first: those past the idle timeout, and one over the limit, are closed.
        while idle and (len(idle) >= self._max_idle or now - idle[0].idle_since >= self._idle_timeout):
            idle[0].close()  # forget() takes it off the list (and the list off the pool once empty)
        self._idle.setdefault(conn.address, []).append(conn)

    def forget(self, conn: Connection) -> None:
        idle = self._idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.address]

    def close(self) -> None:
        """Close the idle connections; those in use are closed when they come back."""
        self._closed = True
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()

    def _take(self, address: Address) -> Connection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_timeout and conn.transport is not None \
                    and not conn.transport.is_closing():
                if not idle:
                    del self._idle[address]
                return conn
            conn.close()
        return None

    async def _connect(self, address: Address) -> Connection:
        host, port, tls = address
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            extra = {"ssl": self._ssl, "server_hostname": host}
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: Connection(self, address), host, port, **extra)
        except TimeoutError as exc:
            if exc.errno is None:  # our connect timeout; the kernel's own (ETIMEDOUT) is an unreachable engine
                raise
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}"
                                if isinstance(exc, OSError) and exc.strerror else
                                f"cannot connect to {host}:{port}: {exc}") from None
        return conn


def request_head(target: bytes, host: bytes, headers: Iterable[tuple[bytes, bytes]], length: int) -> bytes:
    """A POST's head: request line, Host, the headers as given (already filtered), Content-Length."""
    parts = [b"POST ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"Content-Length: %d\r\n\r\n" % length)
    return b"".join(parts)
