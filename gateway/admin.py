"""Admin API: see and steer every model (state, logs, start, stop, sleep, pin), reload models.d,
and follow events live. All routes need the admin key (gateway/routes.py::require_admin)."""

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.config import load_models
from gateway.errors import ApiError
from gateway.routes import require_admin
from waker.config.registry import ConfigError
from waker.errors import ModelNotFound, WakerError
from waker.lifecycle.controller import ModelController
from waker.state import ModelState
from waker.waker import Waker

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _waker(request: Request) -> Waker:
    waker: Waker = request.app.state.waker
    return waker


def _controller(request: Request, name: str) -> ModelController:
    try:
        return _waker(request).controller(name)
    except ModelNotFound as exc:
        raise ApiError(404, exc.message, code="model_not_found", param="model") from None


def model_state(waker: Waker, controller: ModelController) -> dict[str, object]:
    now = waker.clock.now()
    status = controller.status()
    managed = status.spec.manages_lifecycle
    held_on = {n: gb for n in controller.candidates if managed and (gb := waker.admissions[n].held_by(controller)) > 0}
    return {
        "name": status.name, "aliases": list(status.spec.aliases), "state": status.state.value,
        "since_s": round(now - status.since, 1), "in_flight": status.in_flight, "waiting": status.waiting,
        "queued": sum(waker.admissions[n].queue_of(status.name) for n in controller.candidates) if managed else 0,
        "idle_s": None if status.last_used is None else round(now - status.last_used, 1),
        "memory_gb": status.spec.memory_gb, "held_gb": sum(held_on.values()), "held_on": held_on,
        "node": ",".join(controller.placed) or None, "nodes": list(controller.candidates) if managed else [],
        "pinned": controller.pinned, "engine": status.spec.engine.value, "runtime": status.spec.runtime.value,
        "failures": status.failures,
        "retry_in_s": None if status.retry_at is None else round(max(0.0, status.retry_at - now), 1),
        "last_error": status.last_error.reason if status.last_error else None,
        "log_tail": list(status.last_error.log_tail[-10:]) if status.last_error and status.state == "failed" else [],
        "pending_reload": controller.pending_spec is not None, "removed": controller.retired,
    }


@router.get("/state")
async def state(request: Request) -> JSONResponse:
    """Every model's state, work, queue, memory and last error; each node's budget."""
    waker = _waker(request)
    nodes = {name: {"capacity_gb": a.budget.capacity_gb, "total_gb": a.budget.total_gb, "held_gb": a.held_gb(),
                    "queued": a.queued, "live_free_gb": a.probe.free_gb(), "probe": a.probe.name,
                    "high_water_gb": a.high_water_gb, "labels": waker.labels.get(name, {})}
             for name, a in waker.admissions.items()}
    return JSONResponse({"models": [model_state(waker, c) for c in waker.controllers()], "nodes": nodes})


@router.get("/models/{name:path}/logs")
async def logs(name: str, request: Request, lines: int = 100) -> JSONResponse:
    controller = _controller(request, name)
    return JSONResponse({"model": controller.spec.name, "lines": list(await controller.log_tail(lines))})


@router.post("/models/{name:path}/start")
async def start(name: str, request: Request) -> JSONResponse:
    """Bring the model up (through admission, like a request would); returns at once: follow
    /admin/events or poll /admin/state to see it become ready."""
    controller = _controller(request, name)

    async def bring_up() -> None:
        try:
            await controller.ensure_ready()
        except WakerError:
            pass  # the failure is in the model's state and events

    request.app.state.background.add(task := asyncio.create_task(bring_up()))
    task.add_done_callback(request.app.state.background.discard)
    return JSONResponse({"model": controller.spec.name, "state": controller.state.value}, status_code=202)


@router.post("/models/{name:path}/stop")
async def stop(name: str, request: Request) -> JSONResponse:
    controller = _controller(request, name)
    await controller.stop("stopped through the admin API")
    return JSONResponse({"model": controller.spec.name, "state": controller.state.value})


@router.post("/models/{name:path}/sleep")
async def sleep(name: str, request: Request) -> JSONResponse:
    controller = _controller(request, name)
    if controller.spec.idle_action.value != "sleep":
        raise ApiError(409, f"{controller.spec.name} has no sleep mode (idle_action: sleep in models.d)",
                       code="no_sleep_mode")
    if controller.sleep_if_idle("put to sleep through the admin API") is None:
        raise ApiError(409, f"{controller.spec.name} is {controller.state.value} with {controller.in_flight} "
                       "requests in flight: only an idle ready model can sleep", code="not_idle")
    return JSONResponse({"model": controller.spec.name, "state": controller.state.value})


@router.post("/models/{name:path}/pin")
async def pin(name: str, request: Request) -> JSONResponse:
    controller = _controller(request, name)
    controller.pinned = True
    return JSONResponse({"model": controller.spec.name, "pinned": True})


@router.post("/models/{name:path}/unpin")
async def unpin(name: str, request: Request) -> JSONResponse:
    controller = _controller(request, name)
    controller.pinned = False
    _waker(request).cluster.kick_nodes(controller.candidates) if controller.spec.manages_lifecycle else None
    return JSONResponse({"model": controller.spec.name, "pinned": False})


@router.post("/reload")
async def reload(request: Request) -> JSONResponse:
    """Re-read models.d; an invalid one is refused (422) and the running config keeps serving."""
    try:
        report = await reload_config(request.app)
    except ConfigError as exc:
        raise ApiError(422, "models.d was not reloaded:\n" + "\n".join(exc.problems), code="invalid_config") from None
    return JSONResponse(report)


async def reload_config(app: object) -> dict[str, list[str]]:
    waker: Waker = app.state.waker  # type: ignore[attr-defined]
    settings = app.state.settings  # type: ignore[attr-defined]
    registry = await asyncio.to_thread(load_models, settings.config_dir, settings.stats_db)
    return await waker.reload(registry)


@router.get("/events")
async def events(request: Request, recent: int = 50) -> StreamingResponse:
    """Server-sent events: the last `recent` events, then every new one as it happens."""
    waker = _waker(request)

    async def stream() -> AsyncIterator[bytes]:
        for event in waker.events.recent()[-recent:] if recent > 0 else []:
            yield b"data: " + json.dumps(event.as_dict(), default=str).encode() + b"\n\n"
        yield b": live\n\n"
        async for event in waker.events.subscribe():
            yield b"data: " + json.dumps(event.as_dict(), default=str).encode() + b"\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["ModelState", "model_state", "reload_config", "router"]
