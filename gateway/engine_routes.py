"""An engine's own useful routes, through the gateway: `/engines/{model}/{route}` (issue 19).

vLLM's /tokenize, llama.cpp's /props and /slots, SGLang's /get_server_info are the engine's, not OpenAI's, so the proxy
(`POST /v1/*` only) never reaches them. This endpoint forwards exactly the routes the model's engine adapter declares
(`routes` in waker/engines/*.py: an allow-list of EngineRoute), with the methods it declares, and nothing else: never
the sleep, wake, RPC, weight, cache or settings routes, which the waker alone drives or which act on every client.

A request, in order; one refused at a step reaches nothing after it, and starts nothing:
1. Its raw path (as sent: the decoded one hides %2e%2e and %2f) must be normalised by the proxy's own rules
   (gateway/proxy.py `_PATH_CHARS`, `_PATH_ESCAPE`: no dot segment, encoded dot, slash or backslash, control
   character or empty segment), else 400 `invalid_path`.
2. The key (401); the model: the longest run of leading segments that names a model or alias and leaves a route the
   model's engine forwards (model names may hold '/'), else the longest that names one (404 `model_not_found`); the
   key's scope, by canonical name as for a request (403).
3. The route must be one the adapter declares, compared byte for byte (404 `engine_route_not_found`, naming those it
   does forward), called with a method it declares (405). The engine is called on the declared path itself, never
   on the client's bytes; the query string goes as sent.
4. By kind of route (EngineRoute.uses_model):
   - one that asks the model something (tokenize) is leased like a request: it starts a stopped model, wakes a
     sleeping one, waits for room, takes a max_concurrent slot, and counts as use;
   - one that reads the engine's state (props, version, load) is answered only while the model is READY, else 503
     `model_not_running`: looking at a model never starts it, wakes it or keeps it awake. It takes no lease (a lease
     would count as use), so a stop may still end the engine under it: then 502.
5. The answer (these routes don't stream; bounded by `_MAX_ANSWER`) comes back with the engine's status and headers;
   a route that declares `redact` loses those top-level keys from its JSON answer (SGLang's server_args hold its
   api_key).

A body's `model` (vLLM's /tokenize checks it against the name it serves) is replaced by the engine's own name when it
names this model by name or alias, and refused (400 `model_mismatch`) when it names another. The client's key never
reaches the engine (headers as in the proxy). A client that leaves cancels the work; request_timeout bounds it.
Guarded by tests/integration/test_engine_routes.py and tests/unit/engines/test_routes.py.
"""

import asyncio
import functools
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from yarl import URL

from gateway import errors
from gateway.auth import Caller, KeyRing
from gateway.errors import ApiError
from gateway.proxy import (
    _NOT_DOWNSTREAM,
    _NOT_UPSTREAM,
    _PATH_CHARS,
    _PATH_ESCAPE,
    Receive,
    Scope,
    Send,
    _connection_options,
)
from gateway.settings import GatewaySettings
from waker.config.spec import ModelSpec
from waker.engines.base import EngineRoute
from waker.engines.registry import engine_for
from waker.errors import ModelNotFound, WakerError
from waker.gate import Gate
from waker.waker import Waker

log = logging.getLogger("sparkgate.engine_routes")

# "/engines", then at least two segments (the model, then the route), each under the proxy's rules for what may reach
# an engine (gateway/proxy.py `_ENGINE_PATH`).
_SEGMENT = rb"/(?!\.\.?(?:/|\Z))(?:" + _PATH_CHARS + rb"|" + _PATH_ESCAPE + rb")++"
_ENGINES_PATH = re.compile(rb"/engines((?:" + _SEGMENT + rb"){2,}+)")
# Methods whose body is forwarded; any other request is sent without one.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Besides the proxy's: compression (the answer may have to be read as JSON), and method overrides some frameworks obey.
_NOT_UPSTREAM_HERE = _NOT_UPSTREAM | {b"accept-encoding", b"x-http-method-override", b"x-method-override"}
_NOT_DOWNSTREAM_HERE = _NOT_DOWNSTREAM | {b"content-length"}
# The largest answer passed on: /get_server_info or /props is a few kB, /tokenize of a long prompt a few MB.
_MAX_ANSWER = 16 * 1024 * 1024


class _ClientGone(Exception):
    """The client disconnected while its body was read."""


@dataclass(frozen=True, slots=True)
class _Call:
    """What goes to the engine: the declared route, the client's method, query and (for POST) body."""

    method: str
    route: str
    declared: EngineRoute
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    never_starts: bool = False  # a background-task key's call (gateway/tasks.py): served only by a ready model


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class EngineRoutes:
    """The ASGI endpoint of `/engines/{model}/{route}` (see the module docstring)."""

    def __init__(self, waker: Waker, settings: GatewaySettings, session: Callable[[], aiohttp.ClientSession],
                 keys: KeyRing) -> None:
        self._waker = waker
        self._settings = settings
        self._session = session
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            segments = _segments(scope)  # first: a path that could leave the allow-list starts nothing
            caller = self._caller(scope)
            asked, spec, route = self._target(segments)
            if not caller.may_use(asked, spec.name):
                raise errors.forbidden(asked)
            adapter = engine_for(spec.engine)
            declared = adapter.routes.get(route)
            if declared is None:
                raise errors.engine_route_not_found(spec.name, adapter.kind, route, _listing(adapter.routes))
            method = scope["method"]
            if method not in declared.methods:
                allowed = sorted(declared.methods)
                await _send_error(send, errors.engine_route_method_not_allowed(method, route, allowed),
                                  (b"allow", ", ".join(allowed).encode()))
                return
            body = b""
            if method in _BODY_METHODS:
                body = self._with_engine_model(await self._read_body(scope, receive), spec)
            gate = self._waker.gate(spec.name)
        except (ApiError, WakerError) as exc:
            await _send_error(send, exc if isinstance(exc, ApiError) else errors.from_waker(exc))
            return
        except _ClientGone:
            return
        call = _Call(method, route, declared, scope.get("query_string") or b"", scope["headers"], body,
                     never_starts=caller.tasks)
        await self._serve(gate, call, receive, send)

    async def _serve(self, gate: Gate, call: _Call, receive: Receive, send: Send) -> None:
        """Answer `call`, unless the client leaves first (the work is cancelled, its lease given back) or
        request_timeout ends it."""
        work = asyncio.ensure_future(self._use(gate, call) if call.declared.uses_model else self._read(gate, call))
        gone = asyncio.ensure_future(_until_disconnect(receive))
        limit = self._settings.request_timeout or None
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            gone.cancel()
            raise
        gone.cancel()
        if work not in done:
            work.cancel()
            await asyncio.wait({work})  # its lease, if it holds one, is given back
            if not work.cancelled():
                work.exception()  # it ended as it was cancelled: its outcome no longer matters
            if gone not in done:
                await _send_error(send, errors.request_timeout(self._settings.request_timeout))
            return  # a client that left gets nothing
        try:
            answer = work.result()
        except ApiError as exc:
            await _send_error(send, exc)
            return
        except WakerError as exc:
            await _send_error(send, errors.from_waker(exc))
            return
        except Exception:
            log.exception("engine route %s %s failed", call.method, call.route)
            await _send_error(send, ApiError(500, "internal error in the gateway", type="server_error",
                                             code="internal_error"))
            return
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    async def _use(self, gate: Gate, call: _Call) -> _Answer:
        """A route that asks the model something: leased like a request (it may start or wake the model, unless the
        key's calls are background tasks, which never start, wake or wait for one)."""
        if not gate.limited:
            return await self._leased(gate, call)
        async with gate.slot():
            return await self._leased(gate, call)

    async def _leased(self, gate: Gate, call: _Call) -> _Answer:
        if call.never_starts and not gate.ready_now():  # no await from here to the lease: it can't stop meanwhile
            controller = gate.controller
            raise errors.model_not_running(controller.name, str(controller.state.value), call.route)
        endpoint = await gate.acquire()
        try:
            # Held by the lease: the engine can't be stopped or replaced until release().
            handle = gate.controller.handle
            root = handle.root_url if handle is not None else endpoint.api_base.removesuffix("/v1")
            return await self._fetch(root, endpoint.spec, call)
        finally:
            gate.release()

    async def _read(self, gate: Gate, call: _Call) -> _Answer:
        """A route that reads the engine's state: only while the model is READY; it never starts it."""
        controller = gate.controller
        handle = controller.handle
        if not gate.ready_now() or handle is None:
            raise errors.model_not_running(controller.name, str(controller.state.value), call.route)
        return await self._fetch(handle.root_url, controller.spec, call)

    async def _fetch(self, root_url: str, spec: ModelSpec, call: _Call) -> _Answer:
        settings = self._settings
        timeout = aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout,
                                        sock_read=settings.upstream_read_timeout or None)
        url = _engine_url(root_url, call.route, call.query)
        headers = _upstream_headers(call.headers, spec, with_body=call.method in _BODY_METHODS)
        data = call.body if call.method in _BODY_METHODS else None
        try:
            # No redirects: the engine's answer comes back as it is, and nothing else is called.
            async with self._session().request(call.method, url, data=data, headers=headers, timeout=timeout,
                                               allow_redirects=False) as resp:
                body = await _read_whole(resp, _MAX_ANSWER)
                if body is None:
                    raise errors.engine_answer_too_large(spec.name, _MAX_ANSWER)
                status, raw_headers = resp.status, resp.raw_headers
        except aiohttp.ConnectionTimeoutError:
            raise errors.upstream_connect_timeout(spec.name, settings.upstream_connect_timeout) from None
        except aiohttp.SocketTimeoutError:
            raise errors.upstream_timeout(spec.name, settings.upstream_read_timeout) from None
        except TimeoutError:
            raise errors.upstream_connect_timeout(spec.name, settings.upstream_connect_timeout) from None
        except aiohttp.ClientError as exc:
            raise errors.upstream_unreachable(spec.name, str(exc) or type(exc).__name__) from None
        if call.declared.redact and 200 <= status < 300:
            body = _redacted(body, call.declared.redact, spec.name, call.route)
        drop = _NOT_DOWNSTREAM_HERE
        if listed := [v for k, v in raw_headers if k.lower() == b"connection"]:
            drop = drop | _connection_options(listed)
        out = [(k, v) for k, v in raw_headers if k.lower() not in drop]
        out.append((b"content-length", str(len(body)).encode()))
        return _Answer(status, out, body)

    def _caller(self, scope: Scope) -> Caller:
        """Header size limit and the API key, in one pass over the headers."""
        return self._keys.request_caller(scope["headers"], self._settings.max_header_bytes)

    def _target(self, segments: list[str]) -> tuple[str, ModelSpec, str]:
        """The model the path names (as asked, and its spec) and the route after it (see the module docstring)."""
        named: tuple[str, ModelSpec, str] | None = None
        for cut in range(len(segments) - 1, 0, -1):
            # Decoding can't make a '/' or a dot segment: the raw path has neither %2f nor %2e.
            asked = unquote("/".join(segments[:cut]), errors="replace")
            try:
                spec = self._waker.resolve(asked)
            except ModelNotFound:
                continue
            route = "/" + "/".join(segments[cut:])
            if route in engine_for(spec.engine).routes:
                return asked, spec, route
            named = named or (asked, spec, route)
        if named is None:
            raise errors.engine_path_names_no_model(("/engines/" + "/".join(segments))[:200])
        return named

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._settings.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise errors.body_too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _with_engine_model(self, body: bytes, spec: ModelSpec) -> bytes:
        """`body` with its `model` set to the name the engine serves, when it names this model (by name or alias);
        400 when it names another. A body that is not a JSON object with a string `model` goes as it is."""
        try:
            payload = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            return body  # the engine says what it makes of it
        if not isinstance(payload, dict) or not isinstance(named := payload.get("model"), str) \
                or named == spec.upstream_name:
            return body
        try:
            same = self._waker.resolve(named).name == spec.name
        except ModelNotFound:
            same = False
        if not same:
            raise errors.engine_route_model_mismatch(named, spec.name)
        payload["model"] = spec.upstream_name
        try:
            return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        except RecursionError:
            raise errors.bad_json("nested too deeply") from None


def _segments(scope: Scope) -> list[str]:
    """The path's segments after "/engines" (model, then route), still percent-encoded; 400 unless normalised."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    match = _ENGINES_PATH.fullmatch(raw)
    if match is None:
        raise errors.invalid_engine_path(raw[:200].decode("ascii", "backslashreplace"))
    return match.group(1).decode("ascii").split("/")[1:]


def _listing(routes: Mapping[str, EngineRoute]) -> list[str]:
    """The declared routes as "GET /props", for the 404 that names them."""
    return [f"{method} {path}" for path, route in sorted(routes.items()) for method in sorted(route.methods)]


def _upstream_headers(client: list[tuple[bytes, bytes]], spec: ModelSpec, *, with_body: bool) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, its key and compression; the engine's own key when it has one."""
    headers: list[tuple[str, str]] = []
    listed: list[bytes] = []
    for name, value in client:
        if name in _NOT_UPSTREAM_HERE:
            if name == b"connection":
                listed.append(value)
            continue
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    if listed and (options := _connection_options(listed)):
        headers = [(k, v) for k, v in headers if k.lower().encode("latin-1") not in options]
    if with_body and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("Content-Type", "application/json"))
    headers.append(("Accept-Encoding", "identity"))
    if spec.api_key:
        headers.append(("Authorization", f"Bearer {spec.api_key}"))
    return headers


async def _read_whole(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole answer, or None when it is longer than `limit`."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _redacted(body: bytes, keys: frozenset[str], model: str, route: str) -> bytes:
    """`body` (a JSON object) without the top-level `keys`; a 502 when it is not one, since the keys it may hold could
    not be taken out."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise errors.engine_answer_unchecked(model, route) from None
    if not isinstance(payload, dict):
        raise errors.engine_answer_unchecked(model, route)
    if keys.isdisjoint(payload):
        return body
    return json.dumps({k: v for k, v in payload.items() if k not in keys}).encode()


async def _until_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (its request messages, if any, are read and dropped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_error(send: Send, error: ApiError, *extra: tuple[bytes, bytes]) -> None:
    await send({"type": "http.response.start", "status": error.status, "headers": [*error.headers(), *extra]})
    await send({"type": "http.response.body", "body": error.body(), "more_body": False})


@functools.lru_cache(maxsize=256)
def _engine_base(root_url: str) -> tuple[URL, str]:
    """An engine's root URL, parsed once: the URL and its path without a trailing slash."""
    base = URL(root_url)
    return base, base.raw_path.rstrip("/")


def _engine_url(root_url: str, path: str, query: bytes | None) -> URL:
    """The engine's URL for a call: its root's path, then the route's path, both kept encoded (built from parts: a
    concatenated string would be parsed again, and its dot segments resolved)."""
    base, prefix = _engine_base(root_url)
    if not query:
        return base.with_path(prefix + path, encoded=True)
    return URL.build(scheme=base.scheme, authority=base.raw_authority, path=prefix + path,
                     query_string=query.decode("latin-1"), encoded=True)
