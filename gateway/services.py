"""Services beside the models: any HTTP and WebSocket API (ComfyUI, ...) under `/services/<name>/`, woken on demand.

A models.d entry with `engine: service` (waker/engines/service.py) is run, budgeted, evicted and stopped when idle
like any model; only the way in differs. It speaks no OpenAI, so instead of a `model` field its name is in the path:

    /services/<name>/<path>?<query>   every method: forwarded to <service root>/<path>?<query>, body and answer
                                      streamed both ways (uploads and image downloads are never held whole)
    /services/<name>                  a 307 to `/services/<name>/`: a web UI builds its URLs from its page's path
                                      (ComfyUI's frontend takes `api_base` from location.pathname), so it needs the /
    the same paths, as a WebSocket    relayed frame for frame, text and binary, both ways; each side is closed when
                                      the other closes (ComfyUI's progress channel is `/ws?clientId=...`); a
                                      handshake the service leaves unanswered gets 504 after upstream_read_timeout

`<name>` is the service's name or one of its aliases (one plain path segment: waker/config/spec.py).

Who may. HTTP requests have passed the door (gateway/auth.py `Door`, run by GatewayApp); a WebSocket handshake is
checked by the same door here, since browsers let any page open a WebSocket to any host and CORS does not apply:
its Host and Origin are what keep a foreign page off. Then the key, as for a model: `Authorization: Bearer <key>`
(401 without), and the key's globs must match the service's canonical name (403). Keys are never taken from the query
string: URLs are logged (uvicorn logs every WebSocket's path and query), kept in browser history and sent on in
Referer. So a browser UI such as ComfyUI's, which can add no header to its page loads or its WebSocket, works only
through a gateway without keys (loopback, or an SSH tunnel to it); with keys, a service is for API clients that send
the header (README.md "Services").

What the service sees. The path after the prefix, the query and the body as sent; the request's headers but the
hop-by-hop ones, `Host`, the client's gateway key (`Authorization`, `X-Api-Key`: a service that wants a key gets its
entry's own `api_key`) and `Origin`: the door has judged the origin already, and ComfyUI's own check compares it with
the Host it is reached by (server.py `create_origin_only_middleware`), a loopback address that no browser's origin
matches, so it refused every request of its UI through a proxy. `X-Forwarded-Prefix` says where it is mounted. A
redirect to one of its own paths comes back under the prefix.

Holding a service. Each HTTP request holds it (counts in flight, waker/gate.py) from before its body is read until
its answer is sent; each WebSocket from its handshake until it closes. A held service is never idle: its
`idle_timeout` runs from the end of the last request or connection, and it is never evicted as idle. A model that
waits for its memory drains it as it would drain a busy model: after `max_hold` new requests and connections wait
(and start it again once it has stopped), while the open ones are left to finish; nothing cuts an open WebSocket,
which may be following a job. A waiting request for that memory gets 503 `no_room` after `max_wait`, naming the
service and what it holds. A job ComfyUI runs after `POST /prompt` has answered is not seen by the gateway unless a
WebSocket is open: keep one open while jobs run (as its UI and its websocket API example do), or give it an
`idle_timeout` longer than a job.
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from gateway import errors
from gateway.auth import Caller, Door, KeyRing
from gateway.errors import ApiError
from gateway.metrics import UNRESOLVED, Metrics
from gateway.settings import GatewaySettings
from waker.config.spec import EngineKind, ModelSpec
from waker.errors import ModelNotFound, WakerError
from waker.gate import Endpoint, Gate
from waker.waker import Waker

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_T = TypeVar("_T")

log = logging.getLogger("sparkgate.services")

PREFIX = "/services"
# `/services/<name>` and what follows, on the raw path as sent. What follows is printable ASCII without spaces or
# backslashes; its dot segments are refused below. Encoded slashes pass: ComfyUI's user data routes take them
# (`/api/userdata/workflows%2Fa.json`).
_ADDRESS = re.compile(rb"/services/([A-Za-z0-9][A-Za-z0-9._-]*)(/[\x21-\x5b\x5d-\x7e]*)?")
_DOT_SEGMENT = re.compile(rb"(?:\.|%2[eE]){1,2}")

# Per-connection headers (RFC 9110 7.6.1) and what the gateway sets or keeps to itself (see the module docstring).
_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer", b"trailers",
        b"transfer-encoding", b"upgrade", b"proxy-connection"}
_NOT_UPSTREAM = _HOP | {b"host", b"authorization", b"x-api-key", b"origin", b"expect", b"x-forwarded-prefix"}
# A WebSocket handshake's own headers are made anew for the upstream one.
_NOT_UPSTREAM_WS = _NOT_UPSTREAM | {b"content-length", b"sec-websocket-key", b"sec-websocket-version",
                                    b"sec-websocket-extensions", b"sec-websocket-protocol"}
_NOT_DOWNSTREAM = _HOP | {b"server", b"date"}

# How much of a request body is read ahead while its service is woken (HTTP requests: _HttpRelay._read_ahead).
_READ_AHEAD = 1 << 20

# WebSocket close codes an endpoint may send (RFC 6455 7.4): 1005, 1006 and 1015 only report what happened.
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class ClientGone(Exception):
    """The client left before the request was sent on."""


class Services:
    """The ASGI endpoint of every `/services/...` route, HTTP and WebSocket (see the module docstring)."""

    def __init__(self, waker: Waker, settings: GatewaySettings, session: Callable[[], aiohttp.ClientSession],
                 keys: KeyRing, metrics: Metrics, door: Door | None) -> None:
        self._waker = waker
        self._settings = settings
        self._session = session
        self._keys = keys
        self._metrics = metrics
        self._door = door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._socket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    # -- who, and which service ------------------------------------------------------------------------------

    def _caller(self, scope: Scope) -> Caller:
        """Header size limit and the API key, in one pass over the headers."""
        return self._keys.request_caller(scope["headers"], self._settings.max_header_bytes)

    def _service(self, name: str, caller: Caller) -> ModelSpec:
        """The service `name` leads to, if it is one and the key may use it (the same scope check as a model's)."""
        try:
            spec = self._waker.resolve(name)
        except ModelNotFound:
            spec = None
        if spec is None or spec.engine is not EngineKind.SERVICE:
            raise _not_found(name)
        if not caller.may_use(name, spec.name):
            raise ApiError(403, f"This API key may not use the service '{name}'.", code="service_not_allowed")
        return spec

    # -- HTTP --------------------------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.monotonic()
        service_label = key_label = UNRESOLVED
        try:
            name, rest = _address(scope)
            if rest is None:
                query = scope.get("query_string") or b""
                location = f"{PREFIX}/{name}/".encode() + (b"?" + query if query else b"")
                await send({"type": "http.response.start", "status": 307,
                            "headers": [(b"location", location), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            caller = self._caller(scope)
            key_label = caller.name
            spec = self._service(name, caller)
            service_label = spec.name
        except ApiError as error:
            self._metrics.request_done(service_label, key_label, str(error.status), time.monotonic() - arrived, None)
            await _send_error(send, error)
            return
        relay = _HttpRelay(self, scope, send, self._waker.gate(spec.name), name, rest)
        try:
            await relay.run(receive)
        finally:
            status = "client_gone" if relay.gone else relay.status
            self._metrics.request_done(spec.name, caller.name, status, time.monotonic() - arrived, relay.ttfb)

    # -- WebSocket ---------------------------------------------------------------------------------------------

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            refusal = self._door.refusal("GET", scope["headers"]) if self._door is not None else None
            if refusal is not None:
                raise refusal
            name, rest = _address(scope)
            spec = self._service(name, self._caller(scope))
        except ApiError as error:
            await _deny(scope, send, error)
            return
        lease = _Lease(self._waker.gate(spec.name))
        try:
            try:
                endpoint = await _unless_client_leaves(lease.enter(), receive)
            except WakerError as exc:
                await _deny(scope, send, errors.from_waker(exc))
                return
            if endpoint is not None:
                await self._relay_socket(scope, receive, send, spec, endpoint, name, rest)
        finally:
            await lease.exit()  # nothing if nothing was taken

    async def _relay_socket(self, scope: Scope, receive: Receive, send: Send, spec: ModelSpec, endpoint: Endpoint,
                            name: str, rest: bytes | None) -> None:
        url = _service_url(endpoint.root_url, rest or b"/", scope.get("query_string"))
        headers = _upstream_headers(scope["headers"], _NOT_UPSTREAM_WS, spec, name)
        connecting = asyncio.ensure_future(self._session().ws_connect(
            url, headers=headers, protocols=scope.get("subprotocols") or (), autoping=True,
            # Frames are relayed as the service sends them: its own limits apply, not aiohttp's 4 MiB.
            max_msg_size=0))
        # A service may be slow to answer the handshake, or never answer: a client that leaves meanwhile ends the
        # wait, and with it the hold on the service; one that stays is answered 504 after upstream_read_timeout.
        silence = self._settings.upstream_read_timeout
        deadline = asyncio.timeout(silence or None)
        try:
            async with deadline:
                upstream = await _unless_client_leaves(connecting, receive)
            if upstream is None:
                await _close_if_open(connecting)  # answered just as the client left
                return
        except aiohttp.WSServerHandshakeError as exc:
            await _deny(scope, send, ApiError(exc.status if exc.status >= 400 else 502,
                                              f"The service '{spec.name}' refused the WebSocket: {exc.message}",
                                              type="upstream_error", code="bad_gateway"))
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            await _close_if_open(connecting)  # answered just as the deadline passed
            await _deny(scope, send, errors.upstream_timeout(spec.name, silence) if deadline.expired()
                        else errors.upstream_unreachable(spec.name, str(exc) or type(exc).__name__))
            return
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
            inbound = asyncio.ensure_future(_client_to_service(receive, upstream))
            outbound = asyncio.ensure_future(_service_to_client(upstream, send))
            try:
                await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for side in (inbound, outbound):
                    if not side.done():
                        side.cancel()
                        await asyncio.wait({side})  # its end, whatever it is, is read below
            client_code = _outcome(inbound, spec.name)
            _outcome(outbound, spec.name)
            if client_code is not None:
                # The client closed: so does the service's side, with the client's code.
                await upstream.close(code=_sendable(client_code, 1000))
                return
            # The service closed or went away, or a side failed: the service's side is closed, and the client is
            # told with the service's code (1011 where it had none).
            await upstream.close()
            with contextlib.suppress(OSError, RuntimeError):  # the client may be gone as well
                await send({"type": "websocket.close", "code": _sendable(upstream.close_code, 1011)})


async def _unless_client_leaves(work: Awaitable[_T], receive: Receive) -> _T | None:
    """`work`'s result, or None when the WebSocket's client leaves first (`work` is then cancelled). Before the
    handshake is answered the client can send nothing but its leaving, so a client that gave up waits for nothing and
    holds no place in the queue (nor a hold on a service that never answers the upstream handshake)."""
    doing = asyncio.ensure_future(work)
    leaving = asyncio.ensure_future(receive())
    try:
        await asyncio.wait({doing, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in (doing, leaving):
            if not future.done():
                future.cancel()
                await asyncio.wait({future})  # a cancelled lease.enter() gives back what it took on its way out
    if leaving.done() and not leaving.cancelled():
        if not doing.cancelled():
            doing.exception()  # retrieved: a failure nobody waits for any more is not an error to log
        return None
    return doing.result()


async def _close_if_open(connecting: "asyncio.Future[aiohttp.ClientWebSocketResponse]") -> None:
    """Closes the upstream WebSocket a handshake opened when nobody will relay it."""
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        await connecting.result().close()


def _outcome(side: "asyncio.Future[int | None]", service: str) -> int | None:
    """A relay side's result (the client's close code for the inbound side), None if it was cancelled or failed."""
    if side.cancelled():
        return None
    error = side.exception()
    if error is None:
        return side.result()
    if not isinstance(error, aiohttp.ClientError | OSError | RuntimeError):
        log.error("relaying a WebSocket of %s failed", service, exc_info=error)
    return None


class _Lease:
    """One hold on a service: its max_concurrent slot if it has one, then the lease that counts it in flight."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._held = contextlib.AsyncExitStack()

    async def enter(self) -> Endpoint:
        async with contextlib.AsyncExitStack() as stack:  # a failure or a cancel gives back what was taken
            if self._gate.limited:
                await stack.enter_async_context(self._gate.slot())
            endpoint = await self._gate.acquire()
            stack.callback(self._gate.release)
            self._held = stack.pop_all()
        return endpoint

    async def exit(self) -> None:
        await self._held.aclose()

    async def __aenter__(self) -> Endpoint:
        return await self.enter()

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.exit()


async def _client_to_service(receive: Receive, upstream: aiohttp.ClientWebSocketResponse) -> int:
    """Relays the client's frames until it leaves; returns its close code."""
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                await upstream.send_str(text)
            else:
                await upstream.send_bytes(message.get("bytes") or b"")
        elif kind == "websocket.disconnect":
            return int(message.get("code", 1000))


async def _service_to_client(upstream: aiohttp.ClientWebSocketResponse, send: Send) -> None:
    """Relays the service's frames until it closes (pings and pongs are answered by each side's own library)."""
    while True:
        message = await upstream.receive()
        if message.type is aiohttp.WSMsgType.TEXT:
            await send({"type": "websocket.send", "text": message.data})
        elif message.type is aiohttp.WSMsgType.BINARY:
            await send({"type": "websocket.send", "bytes": message.data})
        elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
            return


class _HttpRelay:
    """One HTTP request to a service: hold it, send the request on as it arrives, relay the answer as it comes."""

    def __init__(self, services: Services, scope: Scope, send: Send, gate: Gate, name: str, rest: bytes) -> None:
        self.services = services
        self.scope = scope
        self.send = send
        self.gate = gate
        self.name = name  # as asked (the prefix the answer's redirects go under)
        self.rest = rest
        self.status = "500"
        self.ttfb: float | None = None
        self.started = False
        self.finished = False  # the last of the answer is being sent: uvicorn then says "disconnect" to any receive
        self.gone = False
        self._arrived = time.monotonic()
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def run(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        cancelling = task.cancelling()
        limit = self.services._settings.request_timeout
        deadline = asyncio.timeout(limit or None)
        try:
            async with deadline:
                await self._serve(receive)
        except asyncio.CancelledError:
            if not self.gone or task.uncancel() > cancelling:
                raise
        except TimeoutError:
            if not deadline.expired():
                raise
            await self._fail(errors.request_timeout(limit))
        finally:
            if self._watcher is not None:
                self._watcher.cancel()

    async def _serve(self, receive: Receive) -> None:
        first = await receive()
        if first["type"] == "http.disconnect":
            self.gone = True
            return
        ahead: list[Message] = []
        if not first.get("more_body", False):
            self._watch(receive)  # the whole body is in: what comes next can only be the client leaving
        else:
            # While the service is woken, the body is read ahead (a little of it) to see a client that leaves.
            self._watcher = asyncio.ensure_future(self._read_ahead(receive, ahead, len(first.get("body", b""))))
        try:
            async with _Lease(self.gate) as endpoint:
                reader = self._watcher
                if first.get("more_body", False) and reader is not None and not (ahead and not ahead[-1].get(
                        "more_body", False)):  # unless all was read: the reader then watches for the client leaving
                    reader.cancel()  # the rest is read as it is sent on
                    await asyncio.wait({reader})
                    self._watcher = None
                await self._forward(endpoint, self._body(first, ahead, receive))
        except WakerError as exc:
            await self._fail(errors.from_waker(exc))
        except ClientGone:
            self.gone = True

    def _watch(self, receive: Receive) -> None:
        self._watcher = asyncio.ensure_future(self._leaves(receive))

    async def _leaves(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finished:
            self.gone = True
            if self._task is not None:
                self._task.cancel()

    async def _read_ahead(self, receive: Receive, ahead: list[Message], size: int) -> None:
        """Reads the body into `ahead` while the service is woken, up to _READ_AHEAD bytes: a client that leaves
        meanwhile (an upload given up during a cold start) ends the wait, and nothing of it reaches the service."""
        while size < _READ_AHEAD:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if self._task is not None:
                    self._task.cancel()
                return
            ahead.append(message)
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                await self._leaves(receive)  # the whole body is in: what comes next can only be the client leaving
                return

    def _body(self, first: Message, ahead: list[Message],
              receive: Receive) -> bytes | AsyncIterator[bytes] | None:
        """The request body: whole if it came in one message (None if empty), else its chunks as they arrive (those
        read ahead first)."""
        if not first.get("more_body", False):
            return first.get("body") or None

        async def chunks() -> AsyncIterator[bytes]:
            yield first.get("body", b"")
            for message in ahead:
                if chunk := message.get("body", b""):
                    yield chunk
                if not message.get("more_body", False):
                    return
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.gone = True
                    raise ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    self._watch(receive)
                    return

        return chunks()

    async def _forward(self, endpoint: Endpoint, body: bytes | AsyncIterator[bytes] | None) -> None:
        settings = self.services._settings
        spec = endpoint.spec
        url = _service_url(endpoint.root_url, self.rest, self.scope.get("query_string"))
        headers = _upstream_headers(self.scope["headers"], _NOT_UPSTREAM, spec, self.name)
        # Per request: a service's answer may be slow to begin (a long upload being processed), but never silent
        # for longer than upstream_read_timeout between two reads.
        timeout = aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout,
                                        sock_read=settings.upstream_read_timeout or None)
        try:
            async with self.services._session().request(self.scope["method"], url, headers=headers, data=body,
                                                        allow_redirects=False, timeout=timeout) as resp:
                await self._relay(resp, endpoint)
        except aiohttp.ConnectionTimeoutError:
            await self._fail(errors.upstream_connect_timeout(spec.name, settings.upstream_connect_timeout))
        except TimeoutError as exc:
            if isinstance(exc, aiohttp.ServerTimeoutError):
                await self._fail(errors.upstream_timeout(spec.name, settings.upstream_read_timeout))
            else:
                raise  # the request_timeout's, handled by run()
        except aiohttp.ClientError as exc:
            await self._fail(errors.upstream_unreachable(spec.name, str(exc) or type(exc).__name__))

    async def _relay(self, resp: aiohttp.ClientResponse, endpoint: Endpoint) -> None:
        drop = _NOT_DOWNSTREAM
        if listed := resp.headers.getall("Connection", ()):
            drop = drop | _connection_options(v.encode("latin-1") for v in listed)
        headers = []
        for key, value in resp.raw_headers:
            lowered = key.lower()
            if lowered in drop:
                continue
            if lowered == b"location":
                value = _under_prefix(value, endpoint.root_url, self.name)
            headers.append((key, value))
        self.started = True
        self.status = str(resp.status)
        await self.send({"type": "http.response.start", "status": resp.status, "headers": headers})
        async for chunk in resp.content.iter_any():
            if self.ttfb is None:
                self.ttfb = time.monotonic() - self._arrived
            await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        self.finished = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _fail(self, error: ApiError) -> None:
        """Answer `error` if nothing was sent yet; else cut the connection (a half-sent answer can carry none)."""
        self.status = str(error.status)
        if not self.started:
            self.started = self.finished = True
            await _send_error(self.send, error)
            return
        raise RuntimeError(f"the service's answer broke off: {error.message}")


# -- helpers ---------------------------------------------------------------------------------------------------


def _address(scope: Scope) -> tuple[str, bytes | None]:
    """The service name and the raw path after `/services/<name>` (None when nothing follows, not even a /)."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    match = _ADDRESS.fullmatch(raw)
    if match is None:
        if re.fullmatch(rb"/services/[A-Za-z0-9][A-Za-z0-9._-]*/.*", raw, re.DOTALL):
            raise _invalid_path(raw)
        raise _not_found(raw.removeprefix(b"/services/").split(b"/", 1)[0][:100].decode("ascii", "replace"))
    name, rest = match.group(1).decode("ascii"), match.group(2)
    if rest is not None and any(_DOT_SEGMENT.fullmatch(segment) for segment in rest.split(b"/")):
        raise _invalid_path(raw)
    return name, rest


def _service_url(root_url: str, rest: bytes, query: bytes | None) -> URL:
    """The service's URL for the request: its root, then the path after the prefix and the query, both as sent
    (built from parts, kept encoded: nothing is decoded or resolved on the way)."""
    root = URL(root_url)
    path = root.raw_path.rstrip("/") + rest.decode("ascii")
    return URL.build(scheme=root.scheme, authority=root.raw_authority, path=path,
                     query_string=(query or b"").decode("latin-1"), encoded=True)


def _upstream_headers(raw: Iterable[tuple[bytes, bytes]], dropped: set[bytes], spec: ModelSpec,
                      name: str) -> list[tuple[str, str]]:
    listed = [value for key, value in raw if key == b"connection"]
    if listed:
        dropped = dropped | _connection_options(listed)
    headers = [(key.decode("latin-1"), value.decode("latin-1")) for key, value in raw if key not in dropped]
    headers.append(("X-Forwarded-Prefix", f"{PREFIX}/{name}"))
    if spec.api_key:
        headers.append(("Authorization", f"Bearer {spec.api_key}"))
    return headers


def _under_prefix(location: bytes, root_url: str, name: str) -> bytes:
    """A redirect to one of the service's own paths (`/x`, or its root URL), as the client reaches it."""
    prefix = f"{PREFIX}/{name}".encode()
    root = root_url.rstrip("/").encode()
    if location.startswith(root + b"/") or location == root:
        return prefix + (location[len(root):] or b"/")
    if location.startswith(b"/") and not location.startswith(b"//"):
        return prefix + location
    return location


def _connection_options(values: Iterable[bytes]) -> frozenset[bytes]:
    """The names listed in Connection headers (RFC 9110 7.6.1): options of one hop, forwarded neither way."""
    return frozenset(name for value in values for token in value.split(b",") if (name := token.strip().lower()))


def _sendable(code: int | None, otherwise: int) -> int:
    return code if code is not None and (code in _SENDABLE or 3000 <= code <= 4999) else otherwise


def _not_found(name: str) -> ApiError:
    return ApiError(404, f"There is no service '{name}' (a models.d entry with engine: service).",
                    code="service_not_found")


def _invalid_path(raw: bytes) -> ApiError:
    shown = raw[:200].decode("ascii", "backslashreplace")
    return ApiError(400, f"The path '{shown}' is not forwarded: no '.' or '..' segments (also encoded), spaces, "
                    "backslashes or control characters.", code="invalid_path")


async def _send_error(send: Send, error: ApiError) -> None:
    await send({"type": "http.response.start", "status": error.status, "headers": error.headers()})
    await send({"type": "http.response.body", "body": error.body(), "more_body": False})


async def _deny(scope: Scope, send: Send, error: ApiError) -> None:
    """Refuse a WebSocket handshake: with the error as an HTTP answer where the server can send one, else a 403."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": error.headers()})
        await send({"type": "websocket.http.response.body", "body": error.body()})
    else:
        await send({"type": "websocket.close", "code": 1008})


__all__ = ["PREFIX", "Services"]
