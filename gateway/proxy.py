"""The streaming reverse proxy for every `POST /v1/*`: a plain ASGI app on the hot path.

Only the `model` (and `stream`) fields are read from the body; the original bytes are forwarded
(re-encoded only when an alias must be replaced by the engine's own model name). The engine's
status, headers and body are passed through chunk by chunk, untouched: no assumption that
`data: [DONE]` or usage events exist. The engine is called through gateway/upstream.py; a chunked
body (every stream) is spliced to the client's socket under uvicorn's httptools protocol
(`_Request._splice`: each read from the engine written at once, no task or message per token).
"""

import asyncio
import base64
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway import errors, forms, hints, progress, upstream
from gateway.auth import Caller, KeyRing
from gateway.errors import ApiError
from gateway.metrics import UNRESOLVED, Metrics
from gateway.settings import GatewaySettings
from gateway.tasks import TaskGuard
from waker.config.spec import EngineKind, Progress
from waker.errors import WakerError
from waker.gate import Endpoint, Gate
from waker.waker import Waker

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("sparkgate.proxy")

# The only request paths that reach an engine: "/v1", then segments of RFC 3986 path characters, checked on the raw
# path as sent (the decoded one hides %2e%2e and %2f). Refused: a dot segment ("." or ".."; an encoded dot anywhere),
# an empty segment ("//", a trailing "/"), an encoded "/" or "\\", a backslash, a control character raw or encoded,
# anything not ASCII. What follows "/v1" is forwarded byte for byte after the engine's own API base: `POST /v1/../sleep`
# once reached vLLM's root `/sleep` (yarl resolved the dot segments of a concatenated URL). Guarded by
# tests/integration/test_proxy_hardening.py::test_only_normalised_paths_under_v1_reach_the_engine.
# One regex match over the raw path (~0.5 us); possessive quantifiers keep it linear on a path that fails late.
_PATH_CHARS = rb"[A-Za-z0-9\-._~!$&'()*+,;=:@]++"
_PATH_ESCAPE = rb"%(?![01]|7[fF]|2[eEfF]|5[cC])[0-9A-Fa-f]{2}"
_ENGINE_PATH = re.compile(rb"/v1((?:/(?!\.\.?(?:/|\Z))(?:" + _PATH_CHARS + rb"|" + _PATH_ESCAPE + rb")++)++)")

# Per-connection headers that must not be forwarded (RFC 9110 7.6.1), plus what we set ourselves; the names a
# Connection header lists are dropped too (`_connection_options`).
_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection"}
# The client's gateway key never reaches an engine (engines get their own `api_key` from the spec).
_NOT_UPSTREAM = _HOP | {b"host", b"content-length", b"authorization", b"x-api-key", b"expect"}
_NOT_DOWNSTREAM = _HOP | {b"server", b"date"}
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


# A client that leaves is noticed at most this long after its request arrived (then at once): watching
# for a disconnect costs a task per request, which answers faster than this never need.
_WATCH_AFTER = 0.05
# Answers with a Content-Length up to this size are read whole, then sent in one message.
_WHOLE_BODY = 1024 * 1024
# A query string is forwarded as sent, after the path, if it is printable ASCII (no space or control character could
# end the request line it is written into).
_QUERY = re.compile(rb"[\x21-\x7e]*")


class ClientGone(Exception):
    """The client disconnected; the request is abandoned and upstream work cancelled."""


class Proxy:
    def __init__(self, waker: Waker, settings: GatewaySettings, pool: Callable[[], upstream.Pool],
                 keys: KeyRing, metrics: Metrics) -> None:
        self._waker = waker
        self._settings = settings
        self._pool = pool
        self._keys = keys
        self._metrics = metrics
        self._tasks = TaskGuard.from_settings(settings, waker)
        self._warmer = hints.Warmer()  # starts models for requests answered at once (gateway/hints.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.monotonic()
        # Metric labels only ever take resolved names (bounded), never what the client sent.
        model_label = key_label = UNRESOLVED
        try:
            path = _engine_path(scope)  # first: a path that could leave /v1/ starts nothing
            _check_query(scope)
            caller = self._caller(scope)
            key_label = caller.name
            body = await self._read_body(scope, receive)
            model, stream, payload = _routing_fields(body)
            spec = self._waker.resolve(model)
            model_label = spec.name
            if not caller.may_use(model, spec.name):
                raise errors.forbidden(model)
            if spec.engine is EngineKind.SERVICE:  # no OpenAI routes: starting it would evict models for an error
                raise errors.service_not_a_model(spec.name)
            gate = self._waker.gate(spec.name)
            # A background task (a title, tags...) never starts, wakes or waits for a model: it is served by this
            # one if it can take it now, else by the task model, else refused (gateway/tasks.py). Nothing is awaited
            # from this decision to the lease that `_Request` takes on the model's READY path.
            if (rule := self._tasks.rules.rule(caller, scope["headers"], path, stream, payload)) is not None:
                spec, gate = self._tasks.route(rule, spec, gate, caller, path)
                model_label = spec.name
            if model != spec.upstream_name:
                body = _with_model(body, spec.upstream_name)
        except (ApiError, WakerError) as exc:
            error = exc if isinstance(exc, ApiError) else errors.from_waker(exc)
            self._metrics.request_done(model_label, key_label, str(error.status), time.monotonic() - arrived, None)
            await _send_error(send, error)
            return
        except ClientGone:
            self._metrics.request_done(model_label, key_label, "client_gone", time.monotonic() - arrived, None)
            return

        # From here on a client that leaves cancels the work at once, whatever it is waiting on:
        # a cold start, a queue, or the engine's answer.
        request = _Request(self, scope, send, gate, path, body, stream, arrived, caller.progress)
        try:
            await self._serve(request, receive)
        except Exception:
            request.status = "500"
            # Never a bare 500 with a stack trace: log it, answer in OpenAI's shape if still possible.
            log.exception("proxying %s failed", scope["path"])
            if not request.started:
                await _send_error(send, ApiError(500, "internal error in the gateway", type="server_error",
                                                 code="internal_error"))
            else:
                raise
        finally:
            status = "client_gone" if request.client_gone else request.status
            self._metrics.request_done(spec.name, caller.name, status, time.monotonic() - arrived, request.ttfb)

    async def _serve(self, request: "_Request", receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # Two timers instead of a watcher task and an asyncio.timeout per request (profile: ~6% of the
        # gateway's time at 64 clients): most answers are done before the watcher would be needed.
        request.task = task
        watch = loop.call_later(_WATCH_AFTER, request.watch_disconnect, receive, task)
        limit = self._settings.request_timeout
        deadline = loop.call_later(limit, request.interrupt, task, "timeout") if limit else None
        cancelling = task.cancelling()
        try:
            await request.run()
        except asyncio.CancelledError:
            # Ours (client left, or the time is up) unless someone else cancelled the task too.
            if request.interrupted is None or task.uncancel() > cancelling:
                raise
            if request.interrupted == "timeout":
                await request.fail(errors.request_timeout(self._settings.request_timeout))
            elif request.interrupted == "silent":
                await request.fail(errors.upstream_timeout(request.gate.spec.name,
                                                           self._settings.upstream_read_timeout))
            # A client that left gets nothing, and the server logs nothing.
        finally:
            watch.cancel()
            if deadline is not None:
                deadline.cancel()
            if request.watcher is not None:
                request.watcher.cancel()

    def _caller(self, scope: Scope) -> Caller:
        """Header size limit and the API key, in one pass over the headers."""
        return self._keys.request_caller(scope["headers"], self._settings.max_header_bytes)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | bytearray:
        """The body, read once within max_body_bytes (413 past it: said by Content-Length, or found while reading).

        A body of one chunk (most JSON requests) is the chunk itself; a longer one is appended chunk by chunk to one
        buffer, so an upload is held once (it was the list of its chunks and then their join, twice its size). A
        multipart/form-data body is read into a `forms.FormBody`, which `_routing_fields` routes by its `model`
        field (gateway/forms.py)."""
        limit = self._settings.max_body_bytes
        boundary = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise errors.body_too_large(limit)
            if name == b"content-type" and forms.is_form(value):
                boundary = value
        if boundary is not None:
            boundary = forms.boundary(boundary)  # a 400 before the upload is read when the form can't be parsed
        buffer: bytearray | None = None
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if buffer is None:
                if not more and boundary is None:
                    if len(chunk) > limit:
                        raise errors.body_too_large(limit)
                    return chunk
                buffer = bytearray() if boundary is None else forms.FormBody(boundary)
            if len(buffer) + len(chunk) > limit:
                raise errors.body_too_large(limit)
            buffer += chunk
            if not more:
                return buffer


class _Request:
    """One proxied request: lease the model, call the engine, relay the answer."""

    def __init__(self, proxy: Proxy, scope: Scope, send: Send, gate: Gate, path: str,
                 body: bytes | bytearray, stream: bool, arrived: float, key_progress: Progress | None = None) -> None:
        self.arrived = arrived
        self.key_progress = key_progress  # the caller's key's `progress` setting (gateway/progress.py)
        self.status = "500"
        self.ttfb: float | None = None
        self.proxy = proxy
        self.scope = scope
        self.send = send
        self.gate = gate
        self.path = path  # what follows "/v1" in the request, validated and still percent-encoded
        self.body = body
        self.stream = stream
        self.started = False  # response headers sent
        self.finished = False
        self.interrupted: str | None = None  # "client_gone", "timeout" or "silent": why run() was cancelled
        self.task: asyncio.Task[Any] | None = None
        # Loop time since when the gateway waits on the engine (request sent, or the last chunk relayed); None
        # while it waits on the client instead (a send held up by backpressure is not the engine's silence).
        self.last_read: float | None = 0.0
        self._silence: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.progress: progress.Reporter | None = None  # the opt-in waking progress shown, until the engine answers
        self.upstream: upstream.Connection | None = None  # the engine's connection, once the request is sent

    @property
    def client_gone(self) -> bool:
        return self.interrupted == "client_gone"

    def interrupt(self, task: asyncio.Task[Any], reason: str) -> None:
        """Cancel the request's task for `reason`, once, unless its answer is complete already."""
        if self.interrupted is None and not self.finished:
            self.interrupted = reason
            task.cancel()

    def watch_disconnect(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, task, self))

    async def run(self) -> None:
        if not self.gate.limited:  # no max_concurrent: no slot to take (and no context manager)
            await self._lease_and_forward()
            return
        # A stream that must wait for one of the model's max_concurrent places gets its 200 and comments at once too,
        # as a wait for the model does (`_acquire`): a keeper sends them until the place is ours. A full queue is
        # still a real 429 (checked before anything is sent).
        limiter = self.gate.limiter
        interval = self.proxy._settings.keepalive_interval
        keeper = (asyncio.ensure_future(self._keep_alive(interval))
                  if self.stream and interval > 0 and limiter.must_wait() and not limiter.full() else None)
        try:
            async with self.gate.slot():
                keeper = await _stopped(keeper)
                await self._lease_and_forward()
        except WakerError as exc:  # no slot: too many requests wait for this model already
            await _stopped(keeper)
            await self.fail(errors.from_waker(exc))
        finally:
            await _stopped(keeper)

    async def _keep_alive(self, interval: float) -> None:
        """The 200, the SSE headers and a comment at once, then a comment every `interval`, until cancelled."""
        name = self.gate.spec.name
        await self._start_response(200, _SSE_HEADERS)
        while True:
            await self.send({"type": "http.response.body", "more_body": True,
                             "body": progress.keepalive(name, time.monotonic() - self.arrived)})
            await asyncio.sleep(interval)

    async def _lease_and_forward(self) -> None:
        try:
            endpoint = await self._acquire()
        except WakerError as exc:
            await self.fail(errors.from_waker(exc))
            return
        except ApiError as exc:  # answered at once: the client would time out first (gateway/hints.py)
            await self.fail(exc)
            return
        try:
            await self._forward(endpoint)
        finally:
            self.gate.release()

    async def _acquire(self) -> Endpoint:
        """The model, leased: at once when it is READY (no await before the lease: gateway/tasks.py relies on it),
        else after a wait that the client is told about.

        A non-streaming request whose client would time out first is answered at once instead (gateway/hints.py).
        A streaming one gets its 200, the SSE headers and a first comment at once: clients with a short timeout for
        the headers (Continue's millisecond trap, custom SDK timeouts) used to give up before the first comment,
        5 s in. Then a comment every keepalive_interval (every half of the client's own timeout when its SDK says
        that is shorter), and, opted in, the wake's progress (gateway/progress.py). A request refused at once (a
        failed model in its backoff, a full queue, no room ever) still gets its own status, which the SDKs retry:
        the 200 goes out only after the acquire's first step, where those end. Guarded by
        tests/integration/test_waiting_experience.py."""
        gate = self.gate
        if gate.ready_now():
            return await gate.acquire()
        if not self.stream:
            await self._answer_now_if_the_client_gives_up_first()
            return await gate.acquire()
        interval = self.proxy._settings.keepalive_interval
        if interval <= 0:
            return await gate.acquire()
        acquiring = asyncio.ensure_future(gate.acquire())
        try:
            await asyncio.sleep(0)  # the acquire's first step (it was scheduled before this task's next one)
            if acquiring.done():
                return acquiring.result()
            return await self._wait_streaming(acquiring, interval)
        except BaseException:
            if not acquiring.done():
                acquiring.cancel()
            elif not acquiring.cancelled() and acquiring.exception() is None:
                self.gate.release()  # acquired just as we were cancelled
            raise

    async def _wait_streaming(self, acquiring: "asyncio.Future[Endpoint]", interval: float) -> Endpoint:
        """Send the 200 at once, then keep the stream alive (and show the wake, opted in) until `acquiring` ends."""
        name = self.gate.spec.name
        timeout = hints.client_timeout(self.scope["headers"])
        every = interval if timeout is None else max(0.25, min(interval, timeout.seconds / 2))
        self.progress = self._reporter()
        tick = min(every, 1.0) if self.progress is not None else every  # a new phase is shown within a second
        if not self.started:  # else a wait for a max_concurrent place sent it (`run`)
            await self._start_response(200, _SSE_HEADERS)
        body = progress.keepalive(name, time.monotonic() - self.arrived)
        if self.progress is not None:
            body += self.progress.update(self.proxy._waker.describe())
        await self.send({"type": "http.response.body", "body": body, "more_body": True})
        sent = time.monotonic()
        while True:
            done, _ = await asyncio.wait({acquiring}, timeout=tick)
            if done:
                return acquiring.result()
            now = time.monotonic()
            body = self.progress.update(self.proxy._waker.describe(), now) if self.progress is not None else b""
            if not body and now - sent >= every - tick / 2:
                body = progress.keepalive(name, now - self.arrived)
            if body:
                await self.send({"type": "http.response.body", "body": body, "more_body": True})
                sent = now

    def _reporter(self) -> progress.Reporter | None:
        """The waking progress this stream opted into (its key's `progress`, else its model's), if any."""
        if not progress.applies(self.path, self.stream):
            return None
        spec = self.gate.spec
        style = progress.choose(self.key_progress, spec.progress)
        if style is Progress.OFF:
            return None
        return progress.Reporter(style, spec.name, spec.upstream_name, self.proxy._settings.progress_interval,
                                 self.arrived)

    async def _end_progress(self) -> None:
        """The progress's last chunk (Open WebUI: the status line cleared), before the engine's first byte or the
        error that ends the wait."""
        reporter, self.progress = self.progress, None
        if reporter is not None:
            await self.send({"type": "http.response.body", "body": reporter.done(), "more_body": True})

    async def _answer_now_if_the_client_gives_up_first(self) -> None:
        """Raise the 503 of gateway/hints.py when the model should take longer to be ready than the client's SDK says
        it waits; its start is begun or joined first (a refusal at once, such as a backoff, is the answer then)."""
        timeout = hints.client_timeout(self.scope["headers"])
        if timeout is None:
            return
        proxy, name = self.proxy, self.gate.spec.name
        try:
            wait = hints.expected_wait(proxy._waker.describe(), name)
        except KeyError:  # removed from models.d just now: the acquire says so
            return
        if wait is None or wait <= timeout.seconds:
            return
        warm = proxy._warmer.warm(self.gate)
        await asyncio.sleep(0)  # the warm's first step: admitted, queued, or refused at once
        if warm.done() and not warm.cancelled() and (error := warm.exception()) is not None:
            raise error
        if self.gate.ready_now():
            return
        error = errors.client_would_time_out(name, wait, timeout.seconds, timeout.header)
        log.info("client would time out: %s should be ready in ~%.0fs, the client waits %gs (%s); answered 503 "
                 "with Retry-After %s, its start goes on", name, wait, timeout.seconds, timeout.header,
                 dict(error.headers()).get(b"retry-after", b"").decode())
        raise error

    async def _forward(self, endpoint: Endpoint) -> None:
        settings = self.proxy._settings
        spec = endpoint.spec
        try:
            address, host, target, credentials = _engine_target(endpoint.api_base, self.path,
                                                                self.scope.get("query_string"))
        except (ValueError, UnicodeError) as exc:  # a URL in models.d that is not one: the model's, not the client's
            await self.fail(errors.upstream_unreachable(spec.name,
                                                        f"its URL {endpoint.api_base!r} is not valid: {exc}"))
            return
        headers: list[tuple[bytes, bytes]] = []
        listed: list[bytes] = []
        typed = encodings = False
        for k, v in self.scope["headers"]:
            if k in _NOT_UPSTREAM:
                if k == b"connection":
                    listed.append(v)
                continue
            if k == b"content-type":
                typed = True
            elif k == b"accept-encoding":
                encodings = True
            headers.append((k, v))
        if listed and (options := _connection_options(listed)):
            headers = [(k, v) for k, v in headers if k not in options]
            typed = any(k == b"content-type" for k, _ in headers)
            encodings = any(k == b"accept-encoding" for k, _ in headers)
        # Said outright rather than left to a client library's defaults (octet-stream, gzip): the body is JSON, and
        # bytes come back as the engine sends them, so no compression unless asked for.
        if not typed:
            headers.append((b"content-type", b"application/json"))
        if not encodings:
            headers.append((b"accept-encoding", b"identity"))
        if spec.api_key:
            try:
                headers.append((b"authorization", _bearer(spec.api_key)))
            except ApiError as exc:
                await self.fail(exc)
                return
        elif credentials is not None:  # user:password@ in the engine's URL
            headers.append((b"authorization", credentials))
        # The engine's silence is bounded by one timer per request, re-armed only when it fires early.
        loop = asyncio.get_running_loop()
        self.last_read = loop.time()
        if settings.upstream_read_timeout:
            self._silence = loop.call_later(settings.upstream_read_timeout, self._check_silence)
        pool = self.proxy._pool()
        try:
            try:
                resp = await pool.request(address, upstream.request_head(target, host, headers, len(self.body)),
                                          self.body)
            except TimeoutError:  # connecting took longer than upstream_connect_timeout
                await self.fail(errors.upstream_connect_timeout(spec.name, settings.upstream_connect_timeout))
                return
            self.upstream = resp
            try:
                await self._relay(resp, loop)
            finally:
                # Back to the pool only after a whole answer; else closed, and the engine sees its client leave.
                pool.release(resp)
        except upstream.UpstreamError as exc:
            await self.fail(errors.upstream_unreachable(spec.name, str(exc)))
        finally:
            if self._silence is not None:
                self._silence.cancel()

    def _check_silence(self) -> None:
        timeout = self.proxy._settings.upstream_read_timeout
        loop = asyncio.get_running_loop()
        if self.last_read is None:  # waiting on the client: the engine's silence starts once the send is done
            self._silence = loop.call_later(timeout, self._check_silence)
            return
        # The engine's last bytes: the relay does not note each one (a spliced body never passes through it).
        heard = self.last_read if self.upstream is None else max(self.last_read, self.upstream.received_at)
        quiet = loop.time() - heard
        if quiet < timeout:
            self._silence = loop.call_later(timeout - quiet, self._check_silence)
        elif self.task is not None:
            self.interrupt(self.task, "silent")

    async def _relay(self, resp: upstream.Connection, loop: asyncio.AbstractEventLoop) -> None:
        # The silence timer measures only waits on the engine: `last_read` is None around every send (a client that
        # reads slowly holds it up), and set anew after it. Guarded by tests/integration/
        # test_proxy_hardening.py::test_a_client_that_stops_reading_is_not_an_engine_that_went_silent.
        now = loop.time
        if self.started:
            if self.progress is not None:
                await self._end_progress()  # the wake is over: its status line goes before the engine's first byte
            # Status already sent (keep-alives): an engine error must travel as an SSE event.
            if resp.status != 200:
                self.last_read = now()
                await self.fail(await _engine_error(resp))
                return
        else:
            drop = _NOT_DOWNSTREAM
            if listed := [v for k, v in resp.headers if k.lower() == b"connection"]:
                drop = drop | _connection_options(listed)
            headers = [(k, v) for k, v in resp.headers if k.lower() not in drop]
            self.last_read = None
            await self._start_response(resp.status, headers)
        self.last_read = now()
        if resp.content_length is not None and resp.content_length <= _WHOLE_BODY:
            # A plain answer of known, small size goes out as one message: one write and one turn of
            # the loop fewer than relaying it chunk by chunk and then ending the body.
            body = await resp.read()
            self.finished = True
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            if body:
                self.ttfb = time.monotonic() - self.arrived
            return
        client = _client_stream(self.send)
        if client is not None:
            await self._splice(resp, *client, loop)
        else:
            # Per chunk: one read of whatever has arrived, one send.
            send = self.send
            while chunk := await resp.readany():
                self.last_read = None
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.last_read = now()
                if self.ttfb is None:
                    self.ttfb = time.monotonic() - self.arrived  # the first engine bytes (keep-alives don't count)
        self.finished = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _splice(self, resp: upstream.Connection, transport: asyncio.Transport, flow: Any,
                      loop: asyncio.AbstractEventLoop) -> None:
        """The body written to the client's socket, as a chunk of the response's chunked encoding, from the callback
        that read it from the engine's: no turn of the event loop, task or message in between (`_client_stream`).
        A client that reads slower than the engine writes fills its socket's buffer; then the engine's is not read
        until the client's has drained (the engine's own writes block: backpressure end to end)."""
        arrived = self.arrived

        def write(data: bytes) -> None:
            if transport.is_closing():  # the client left: the disconnect watch cancels the request
                return
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            if self.ttfb is None:
                self.ttfb = time.monotonic() - arrived  # the first engine bytes (keep-alives don't count)
            if flow.write_paused:
                resp.pause_reading()
                resp.notify()

        resp.splice(write)
        while not resp.complete:
            await resp.wait()
            if flow.write_paused and not resp.complete:
                self.last_read = None
                await flow.drain()
                self.last_read = loop.time()
            # Also when the client's socket drained before this task ran: the engine's was paused all the same.
            resp.resume_reading()

    async def _start_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = str(status)
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def fail(self, error: ApiError) -> None:
        """Report `error`: as a response if nothing was sent yet, else in-band or by cutting off."""
        self.status = str(error.status)
        if not self.started:
            self.finished = True
            await _send_error(self.send, error)
            return
        if self.stream:
            if self.progress is not None:
                await self.send({"type": "http.response.body", "body": self.progress.failed(), "more_body": True})
            self.finished = True
            await self.send({"type": "http.response.body", "body": _sse_error(self.path, error), "more_body": False})
            return
        # A non-streaming body already half sent can't carry an error: cut the connection so the
        # client sees a broken response, never a silently truncated success.
        raise RuntimeError(f"upstream broke mid-response: {error.message}")


async def _stopped(keeper: "asyncio.Future[None] | None") -> None:
    """`keeper` cancelled and ended (None is nothing to stop); returns None, for `keeper = await _stopped(keeper)`."""
    if keeper is None:
        return None
    if not keeper.done():
        keeper.cancel()
        await asyncio.wait({keeper})  # never raises the keeper's cancellation; ours still reaches us
    if not keeper.cancelled() and (error := keeper.exception()) is not None:
        raise error  # a send that failed: as if this task had sent it
    return None


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any], request: _Request) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            request.interrupt(task, "client_gone")
            return


async def _engine_error(resp: upstream.Connection) -> ApiError:
    text = (await resp.read()).decode(errors="replace")
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        message = json.loads(text)["error"]["message"]
        return ApiError(resp.status, message, type="upstream_error")
    return ApiError(resp.status, text[:2000] or f"engine answered {resp.status}", type="upstream_error")


def _client_stream(send: Send) -> tuple[asyncio.Transport, Any] | None:
    """The client's socket and uvicorn's flow control for it, when a body may be written to it directly (`_Request.
    _splice`): the server is uvicorn's httptools protocol (`sparkgate serve` runs it) and the response it started is
    in chunked encoding (the engine said no Content-Length). Else None, and the body goes through ASGI's `send`."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle:
        return None
    if cycle.chunked_encoding is not True or cycle.response_complete or cycle.disconnected:
        return None
    return cycle.transport, cycle.flow


def _check_query(scope: Scope) -> None:
    """A 400 for a query string that could not be written into the request line to the engine as it was sent."""
    query = scope.get("query_string")
    if query and _QUERY.fullmatch(query) is None:
        raise ApiError(400, "The query string has spaces, control characters or bytes that are not ASCII: "
                       "percent-encode them.", code="invalid_query")


def _engine_path(scope: Scope) -> str:
    """What follows "/v1" in the request's raw path, if it may reach an engine (see `_ENGINE_PATH`); else a 400."""
    # ASGI lets a server leave raw_path out: then the decoded path is all there is (its dot segments still show).
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    match = _ENGINE_PATH.fullmatch(raw)
    if match is None:
        shown = raw[:200].decode("ascii", "backslashreplace")
        raise ApiError(400, f"The path '{shown}' is not forwarded: only normalised paths under /v1/ reach a model "
                       "(no '.' or '..' segments, empty segments, encoded dots, slashes or backslashes, backslashes "
                       "or control characters).", code="invalid_path")
    return match.group(1).decode("ascii")


@functools.lru_cache(maxsize=256)
def _engine_base(api_base: str) -> tuple[upstream.Address, bytes, bytes, bytes | None]:
    """An engine's API base, parsed once: its address, its Host header, its path without a trailing slash
    (percent-encoded where it is not ASCII), and the Basic credentials its URL holds, if any (a ValueError for a port
    that is not one)."""
    url = urlsplit(api_base)
    tls = url.scheme == "https"
    host = url.hostname or "127.0.0.1"
    port = url.port or (443 if tls else 80)
    authority = url.netloc.rpartition("@")[2].encode("idna")
    path = quote(url.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~").encode("ascii")
    credentials = None
    if url.username is not None:
        user_password = f"{unquote(url.username)}:{unquote(url.password or '')}"
        credentials = b"Basic " + base64.b64encode(user_password.encode())
    return (host, port, tls), authority, path, credentials


def _engine_target(api_base: str, path: str, query: bytes | None) -> tuple[upstream.Address, bytes, bytes,
                                                                              bytes | None]:
    """The engine's address, Host header, request target and credentials for a request: its API base's path, then
    the request's validated path, both kept encoded, then the query as sent."""
    address, host, prefix, credentials = _engine_base(api_base)
    target = prefix + path.encode("ascii")
    if query:  # checked by `_check_query` before anything started
        target += b"?" + query
    return address, host, target, credentials


@functools.lru_cache(maxsize=256)
def _bearer(key: str) -> bytes:
    value = b"Bearer " + key.encode()
    if b"\r" in value or b"\n" in value:  # never a second header line in the request to the engine
        raise ApiError(500, "the model's api_key holds a line break", type="server_error",
                       code="invalid_api_key_config")
    return value


def _connection_options(values: Iterable[bytes]) -> frozenset[bytes]:
    """The names listed in Connection headers (RFC 9110 7.6.1): options of one hop, forwarded neither way."""
    return frozenset(name for value in values for token in value.split(b",") if (name := token.strip().lower()))


def _routing_fields(body: bytes | bytearray) -> tuple[str, bool, dict[str, Any]]:
    """The body's `model`, whether its answer is an SSE stream, and the parsed body (gateway/tasks.py reads its
    messages without parsing again; a form's is its routing fields); a 400 for anything else.

    `stream` must be a boolean (or null, or absent: no stream), as OpenAI's API has it: engines read other values
    differently (vLLM's pydantic model takes "true" and 1 for true, llama.cpp's server does not), and the gateway
    must agree with the engine on whether an answer streams (keep-alives while a model starts, errors in-band), so
    neither may guess. Guarded by tests/integration/test_request_body.py. A form says it in text: "true" or "false"
    (what OpenAI's SDKs send), anything else is refused.

    `stream_format` (text to speech: OpenAI's `/v1/audio/speech`, vLLM-Omni's) decides over `stream`: "audio" is raw
    audio bytes, never SSE (keep-alive comments would be written into the audio), "sse" is SSE even without
    `stream` (vllm_omni/entrypoints/openai/protocol/audio.py, `is_sse_stream`). Guarded by
    tests/integration/test_endpoints.py."""
    if isinstance(body, forms.FormBody):
        fields = forms.read_fields(body)
        model_field = fields.get("model")
        if model_field is None or not model_field.value:
            raise errors.missing_form_model()
        stream_field = fields.get("stream")
        form_stream = stream_field.value.lower() if stream_field is not None else "false"
        if form_stream not in ("true", "false"):
            raise errors.invalid_form_boolean("stream", stream_field.value if stream_field else "")
        return model_field.value, form_stream == "true", {name: field.value for name, field in fields.items()}
    payload = _parse(body)
    if not isinstance(payload, dict):
        raise errors.bad_json("expected a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise errors.missing_model()
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise errors.invalid_type("stream", "a boolean", stream)
    stream_format = payload.get("stream_format")
    if stream_format == "audio":
        return model, False, payload
    return model, stream is True or stream_format == "sse", payload


def _parse(body: bytes | bytearray) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_json(str(exc)) from None
    except RecursionError:
        # Arrays or objects nested deeper than the parser's stack allows (it recurses per level; about 1000):
        # no request needs that, and uncaught it was a text/plain 500 with a traceback logged per request.
        raise errors.bad_json("nested too deeply") from None


def _with_model(body: bytes | bytearray, model: str) -> bytes | bytearray:
    """The body with `model` (the engine's own name, for an alias) in place of the name the client sent: a form's
    field is written over in place (gateway/forms.py); a JSON body is parsed and written again."""
    if isinstance(body, forms.FormBody):
        forms.set_field(body, "model", model)
        return body
    payload = _parse(body)
    payload["model"] = model
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    except RecursionError:  # parsed just under the limit, from a shallower stack than this one
        raise errors.bad_json("nested too deeply") from None


def _sse_error(path: str, error: ApiError) -> bytes:
    """`error` as the last event of a stream whose 200 was sent: in Anthropic's shape for its Messages API (which
    vLLM and llama.cpp serve at /v1/messages), in OpenAI's otherwise."""
    if path == "/messages" or path.startswith("/messages/"):
        return errors.anthropic_sse_event(error)
    return error.sse_event()


async def _send_error(send: Send, error: ApiError) -> None:
    await send({"type": "http.response.start", "status": error.status, "headers": error.headers()})
    await send({"type": "http.response.body", "body": error.body(), "more_body": False})
