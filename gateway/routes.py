"""The gateway's own GET routes: model list and health."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.errors import ApiError
from waker.errors import ModelNotFound
from waker.model import ModelStatus
from waker.waker import Waker

router = APIRouter()


def _waker(request: Request) -> Waker:
    waker: Waker = request.app.state.waker
    return waker


def _model_entry(name: str, status: ModelStatus, created: int, now: float) -> dict[str, object]:
    spec = status.spec
    entry: dict[str, object] = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "sparkgate",
        # Extra fields: OpenAI clients ignore them; people and status tools read them.
        "state": status.state.value,
        "engine": spec.engine.value,
        "runtime": spec.runtime.value,
        "memory_gb": spec.memory_gb,
    }
    if name != spec.name:
        entry["alias_of"] = spec.name
    if status.last_error is not None and status.state.value == "failed":
        entry["error"] = status.last_error.reason
        entry["failures"] = status.failures  # a crash loop shows here, with its backoff
        if status.retry_at is not None:
            entry["retry_in"] = round(max(0.0, status.retry_at - now), 1)
    return entry


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """Every configured model and alias, whether running or not, with its state."""
    waker = _waker(request)
    statuses = {s.name: s for s in waker.statuses()}
    created = request.app.state.created
    now = waker.clock.now()
    data = [_model_entry(name, statuses[target], created, now) for name, target in waker.registry.routes().items()]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    waker = _waker(request)
    try:
        spec = waker.resolve(model_id)
    except ModelNotFound as exc:
        raise ApiError(404, exc.message, code="model_not_found", param="model") from None
    status = waker.controller(spec.name).status()
    return JSONResponse(_model_entry(model_id, status, request.app.state.created, waker.clock.now()))


@router.get("/health")
async def health() -> dict[str, str]:
    """The gateway itself is up (models may be cold: that is normal)."""
    return {"status": "ok"}
