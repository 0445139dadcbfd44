"""Admin API: see and steer every model (state, logs, start, stop, sleep, pin), reload models.d,
and follow events live. All routes need the admin key (gateway/routes.py::require_admin)."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.background import spawn
from gateway.config import load_models
from gateway.errors import ApiError, from_waker
from gateway.routes import require_admin
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError
from waker.errors import WakerError
from waker.events import FellBehind
from waker.state import ModelState
from waker.status import Admission, ModelStatus, NodeStatus
from waker.waker import Waker

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
log = logging.getLogger("sparkgate.admin")


def _waker(request: Request) -> Waker:
    waker: Waker = request.app.state.waker
    return waker


def _status(request: Request, name: str) -> ModelStatus:
    try:
        return _waker(request).describe().model(name)
    except KeyError:
        raise ApiError(404, f"The model '{name}' does not exist", code="model_not_found", param="model") from None


def model_state(status: ModelStatus, now: float) -> dict[str, object]:
    """One model as /admin/state shows it (field names are part of the admin API)."""
    failed = status.state is ModelState.FAILED
    return {
        "name": status.name, "aliases": list(status.spec.aliases), "state": status.state.value,
        "since_s": round(now - status.since, 1), "in_flight": status.in_flight, "waiting": status.waiting,
        "queued": status.queued,
        "idle_s": None if status.last_used is None else round(now - status.last_used, 1),
        "memory_gb": status.spec.memory_gb, "held_gb": status.held_gb, "held_on": dict(status.held_on),
        "node": ",".join(status.placed) or None, "nodes": list(status.nodes),
        "pinned": status.pinned, "engine": status.spec.engine.value, "runtime": status.spec.runtime.value,
        "failures": status.failures,
        "retry_in_s": None if status.retry_at is None else round(max(0.0, status.retry_at - now), 1),
        "last_error": status.last_error.reason if status.last_error else None,
        "log_tail": list(status.last_error.log_tail[-10:]) if status.last_error and failed else [],
        "pending_reload": status.pending_reload, "removed": status.removed,
        "starts": status.starts, "typical_start_s": status.typical_start_s, "typical_wake_s": status.typical_wake_s,
        "admission": admission_state(status.admission, now),
    }


def admission_state(admission: Admission, now: float) -> dict[str, object]:
    """A model's latest ask for room as /admin/state shows it (see README, Admin API)."""
    return {"outcome": admission.outcome, "reason": admission.reason,
            "since_s": None if admission.since is None else round(now - admission.since, 1),
            "attempt": admission.attempt, "node": admission.node, "position": admission.position,
            "waiting_for": list(admission.waiting_for)}


def node_state(node: NodeStatus, config: NodeConfig | None = None) -> dict[str, object]:
    """One node as /admin/state shows it; `config`: its settings, resolved at startup (where its total came from)."""
    return {"capacity_gb": node.capacity_gb, "total_gb": node.total_gb, "held_gb": node.held_gb,
            "queued": node.queued, "live_free_gb": node.live_free_gb, "probe": node.probe,
            "high_water_gb": node.high_water_gb, "labels": dict(node.labels),
            "total_source": config.total_source if config else None,
            "unified_memory": config.unified_memory if config else None}


@router.get("/state")
async def state(request: Request) -> JSONResponse:
    """Every model's state, work, queue, memory and last error; each node's budget."""
    described = _waker(request).describe()
    configs = request.app.state.settings.nodes
    return JSONResponse({"models": [model_state(s, described.now) for s in described.models],
                         "nodes": {n.name: node_state(n, configs.get(n.name)) for n in described.nodes},
                         "stats": stats_state(request)})


def stats_state(request: Request) -> dict[str, object]:
    """Whether memory sampling runs (stats/: optional, so a bad database turns it off instead of the gateway), and
    why not, or why its last round failed."""
    sampler = getattr(request.app.state, "sampler", None)
    off = getattr(request.app.state, "stats_off", None)
    return {"enabled": sampler is not None, "off_because": off,
            "last_error": sampler.error if sampler is not None else None}


@router.get("/models/{name:path}/logs")
async def logs(name: str, request: Request, lines: int = 100) -> JSONResponse:
    status = _status(request, name)
    if lines < 0:
        raise ApiError(400, "lines must be 0 or more", code="invalid_request", param="lines")
    return JSONResponse({"model": status.name, "lines": list(await _waker(request).logs(status.name, lines))})


@router.post("/models/{name:path}/start")
async def start(name: str, request: Request) -> JSONResponse:
    """Bring the model up through admission, like a request would, and answer with the admission's first outcome:
    202 with `admission` (queued for memory: its place and what it waits behind; admitted: it starts), or the
    error a request would get when it is refused at once (503 no room ever, 429 the node's queue full, 503 a
    failed model in its backoff). Follow /admin/state (or /admin/events) from there: `attempt` names this start's
    admission and start attempts, so an older outcome or failure is not taken for its own."""
    waker = _waker(request)
    status = _status(request, name)
    joins = status.state in (ModelState.STARTING, ModelState.WAKING)  # it joins the start (or wake) under way
    attempt = {"admission": status.admission.attempt + (0 if status.admission.outcome == "queued" else 1),
               "start": status.starts + (0 if joins else 1)}
    task = spawn(request.app.state.background, waker.gate(status.name).warm(), f"warm {status.name}")
    # One turn of the loop runs the warm's first step: for a stopped (or failed) model, its whole admission
    # decision is made in it, synchronously (ClusterAdmission.enqueue): admitted, queued, or refused.
    await asyncio.sleep(0)
    if task.done() and not task.cancelled() and isinstance(error := task.exception(), WakerError):
        raise from_waker(error)
    described = waker.describe()
    current = described.model(status.name)
    return JSONResponse({"model": current.name, "state": current.state.value,
                         "admission": admission_state(current.admission, described.now), "attempt": attempt},
                        status_code=202)


@router.post("/models/{name:path}/stop")
async def stop(name: str, request: Request) -> JSONResponse:
    status = _status(request, name)
    await _waker(request).stop(status.name, "stopped through the admin API")
    return JSONResponse({"model": status.name, "state": _status(request, name).state.value})


@router.post("/models/{name:path}/sleep")
async def sleep(name: str, request: Request) -> JSONResponse:
    status = _status(request, name)
    if status.spec.idle_action.value != "sleep":
        raise ApiError(409, f"{status.name} has no sleep mode (idle_action: sleep in models.d)", code="no_sleep_mode")
    if not _waker(request).sleep(status.name, "put to sleep through the admin API"):
        raise ApiError(409, f"{status.name} is {status.state.value} with {status.in_flight} requests in flight: only "
                       "an idle ready model can sleep", code="not_idle")
    return JSONResponse({"model": status.name, "state": _status(request, name).state.value})


@router.post("/models/{name:path}/pin")
async def pin(name: str, request: Request) -> JSONResponse:
    status = _status(request, name)
    _waker(request).pin(status.name, True)
    return JSONResponse({"model": status.name, "pinned": True})


@router.post("/models/{name:path}/unpin")
async def unpin(name: str, request: Request) -> JSONResponse:
    status = _status(request, name)
    _waker(request).pin(status.name, False)
    return JSONResponse({"model": status.name, "pinned": False})


@router.post("/reload")
async def reload(request: Request) -> JSONResponse:
    """Re-read models.d; an invalid one is refused (422) and the running config keeps serving."""
    try:
        report = await reload_config(request.app)
    except ConfigError as exc:
        raise ApiError(422, "models.d was not reloaded:\n" + "\n".join(exc.problems), code="invalid_config") from None
    return JSONResponse(report)


async def reload_config(app: object) -> dict[str, list[str]]:
    """Re-read models.d and apply it (reloads run one at a time: see Waker.reload_from)."""
    waker: Waker = app.state.waker  # type: ignore[attr-defined]
    settings = app.state.settings  # type: ignore[attr-defined]
    return await waker.reload_from(partial(load_models, settings.config_dir, settings.stats_db, settings.nodes,
                                             gateway=(settings.host, settings.port)))


# The events a client of /admin/events may leave unread (its socket full: it stopped reading) before it is dropped.
EVENTS_BACKLOG = 1000


@router.get("/events")
async def events(request: Request, recent: int = 50) -> StreamingResponse:
    """Server-sent events: the last `recent` events, then every new one as it happens. A client that leaves more
    than EVENTS_BACKLOG of them unread is dropped (waker/events.py::EventLog.subscribe): its stream ends with a
    comment that says so, and it reconnects to follow again (the status page does)."""
    waker = _waker(request)

    async def stream() -> AsyncIterator[bytes]:
        for event in waker.events.recent()[-recent:] if recent > 0 else []:
            yield b"data: " + json.dumps(event.as_dict(), default=str).encode() + b"\n\n"
        yield b": live\n\n"
        try:
            async for event in waker.events.subscribe(backlog=EVENTS_BACKLOG):
                yield b"data: " + json.dumps(event.as_dict(), default=str).encode() + b"\n\n"
        except FellBehind as exc:
            yield f": fell behind: {exc}; reconnect to follow again\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["ModelState", "model_state", "reload_config", "router"]
