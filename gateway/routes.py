"""The gateway's own routes: the model list, llama.cpp's load and unload, health.

`GET /v1/models` (and `GET /models`, where llama.cpp's router lists them) is formatted by gateway/model_list.py.
`POST /models/load` and `POST /models/unload` are llama.cpp's router API (tools/server/README.md, "Using multiple
models"), at the root as llama.cpp serves them: Open WebUI's llama.cpp provider calls them on the connection's URL
with `/v1` taken off (routers/openai.py `get_model_management_root_url`), with the connection's key and the body
`{"model": "<id>"}`. Each is scoped like a request: the key must be allowed the model (the admin key is allowed all),
so Open WebUI's Loaded indicator and Eject button show and drive the gateway's real state, for its own models only.
"""

import asyncio
import json
import logging
from collections.abc import Coroutine

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway import errors
from gateway.auth import Caller, KeyRing
from gateway.background import spawn
from gateway.errors import ApiError, from_waker
from gateway.model_list import model_entry, status_of
from waker.config.spec import EngineKind
from waker.errors import WakerError
from waker.state import ModelState
from waker.waker import Waker

router = APIRouter()
log = logging.getLogger("sparkgate.gateway")

S = ModelState
MAX_OPERATION_BODY = 64 * 1024
"""A load or unload body is `{"model": "<id>"}`: anything much larger is not one."""


def _waker(request: Request) -> Waker:
    waker: Waker = request.app.state.waker
    return waker


def _caller(request: Request) -> Caller:
    keys: KeyRing = request.app.state.keys
    caller = keys.caller(request.headers.get("authorization"))
    if caller is None:
        raise errors.unauthorized()
    return caller


def require_admin(request: Request) -> None:
    """Admin routes need the admin key (never a client key). A gateway with no keys at all (which
    only serves loopback unless told otherwise) leaves them open like everything else; one with client
    keys but no admin key keeps them shut."""
    keys: KeyRing = request.app.state.keys
    if not keys.enabled and not keys.has_admin:
        return
    if not keys.is_admin(request.headers.get("authorization")):
        raise ApiError(401, "This route needs the admin key (settings: admin_key).", code="admin_key_required")


def _not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")


# -- the list ------------------------------------------------------------------------------------------------------


@router.get("/v1/models")
@router.get("/models")  # llama.cpp's router lists here too; Open WebUI's model management reads it
async def list_models(request: Request) -> JSONResponse:
    """Every configured model (and alias, unless list_aliases is off) the key may use, whether running or not."""
    caller = _caller(request)
    described = _waker(request).describe()
    statuses = {s.name: s for s in described.models}
    created = request.app.state.created
    aliases = request.app.state.settings.list_aliases
    # A key sees only the models it may use.
    # Services (engine: service) are reached under /services/<name>/, not by a `model`: a chat client must not offer
    # them as models.
    data = [model_entry(name, statuses[target], created, described.now) for name, target in described.routes.items()
            if target in statuses and (aliases or name == target) and caller.may_use(name, target)
            and statuses[target].spec.engine is not EngineKind.SERVICE]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    """One model or alias (an alias answers here even when list_aliases hides it: it routes all the same)."""
    caller = _caller(request)
    described = _waker(request).describe()
    target = described.routes.get(model_id)
    if target is None or not caller.may_use(model_id, target):
        raise _not_found(model_id)
    status = described.model(target)
    return JSONResponse(model_entry(model_id, status, request.app.state.created, described.now))


# -- llama.cpp's router API: load and unload -----------------------------------------------------------------------


async def _operation(request: Request) -> tuple[str, str]:
    """The model a load or unload names (canonical) and who asks (for the event's reason).
    401 without a valid key, 400 for a body that is not `{"model": "<id>"}`, 404 for a model that does not exist,
    403 for one the key may not use (as a request for it would be)."""
    keys: KeyRing = request.app.state.keys
    authorization = request.headers.get("authorization")
    admin = keys.is_admin(authorization)
    caller = None if admin else _caller(request)
    asked = _model_field(await _small_body(request))
    described = _waker(request).describe()
    target = described.routes.get(asked)
    if target is None:
        raise _not_found(asked)
    if caller is not None and not caller.may_use(asked, target):
        raise errors.forbidden(asked)
    return target, "the admin key" if caller is None else f"key {caller.name!r}"


async def _small_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_OPERATION_BODY:
            raise errors.body_too_large(MAX_OPERATION_BODY)
    return bytes(body)


def _model_field(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise errors.bad_json(str(exc)) from None
    if not isinstance(data, dict):
        raise ApiError(400, 'The request body must be a JSON object: {"model": "<id>"}.', code="invalid_request")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise errors.invalid_type("model", "a string", model)
    if not model:
        raise errors.missing_model()
    return model


def _answer(waker: Waker, name: str) -> JSONResponse:
    """llama.cpp's `{"success": true}`, with where the model is now."""
    current = waker.describe().model(name)
    return JSONResponse({"success": True, "model": name, "status": status_of(current), "state": current.state.value})


def _spawn(request: Request, operation: Coroutine[object, object, None], name: str) -> "asyncio.Task[None]":
    """Run an operation in the app's background (cancelled at shutdown), a failure logged rather than lost."""
    return spawn(request.app.state.background, operation, name)


@router.post("/models/load")
async def load_model(request: Request) -> JSONResponse:
    """Start the model through admission, as a request would, and answer at once (the start goes on): 200 with its
    status (`loading`, or `loaded` if it was up), or the error a request gets when it is refused at once (503 no
    room ever, 429 the node's queue full, 503 a failed model in its backoff). A model that is up already is loaded:
    200, not llama.cpp's 400, so a second click or a retry is harmless."""
    name, _ = await _operation(request)
    waker = _waker(request)
    task = _spawn(request, waker.gate(name).warm(), f"load {name}")
    # One turn of the loop runs the warm's first step: for a stopped (or failed) model its whole admission decision
    # is made in it, synchronously (ClusterAdmission.enqueue): admitted, queued, or refused.
    await asyncio.sleep(0)
    if task.done() and not task.cancelled() and isinstance(error := task.exception(), WakerError):
        raise from_waker(error)
    return _answer(waker, name)


@router.post("/models/unload")
async def unload_model(request: Request) -> JSONResponse:
    """Stop the model, never under a request: an idle one is stopped now (200 `unloaded`; the engine goes in the
    background), one serving requests is refused (409 model_busy: try again once they end, or let its idle_timeout
    stop it), a pinned one too (409 model_pinned), and an external endpoint can't be (409 not_managed). A start or
    wake under way is cancelled (its waiting requests get an error). Unloading a stopped model is a success."""
    name, who = await _operation(request)
    waker = _waker(request)
    status = waker.describe().model(name)
    if not status.managed:
        raise ApiError(409, f"{name} is an external endpoint: this gateway does not start or stop it.",
                       code="not_managed", param="model")
    if status.pinned:
        raise ApiError(409, f"{name} is pinned and is not unloaded: unpin it first (POST /admin/models/{name}/unpin, "
                       "or pinned: false in models.d).", code="model_pinned", param="model")
    reason = f"unloaded through /models/unload by {who}"
    # Checked and begun in one step (no await between): a request that took the model just before keeps it.
    if status.state is S.READY and waker.controller(name).stop_if_idle(reason, ignore_waiting=True) is not None:
        return _answer(waker, name)
    if status.state is S.READY and (in_flight := waker.describe().model(name).in_flight):
        raise ApiError(409, f"{name} is serving {in_flight} request(s) and is not unloaded under them: try again "
                       "once they end, or let its idle_timeout stop it.", code="model_busy", param="model")
    if status.state is not S.STOPPED:
        _spawn(request, waker.stop(name, reason), f"unload {name}")
        await asyncio.sleep(0)  # the stop's first step: it takes a start, wake or sleep over (STOPPING)
    return _answer(waker, name)


@router.get("/health")
async def health() -> dict[str, str]:
    """The gateway itself is up (models may be cold: that is normal)."""
    return {"status": "ok"}
