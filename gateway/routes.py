"""The gateway's own routes: model list, health, admin state."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway import errors
from gateway.auth import Caller, KeyRing
from gateway.errors import ApiError
from waker.status import ModelStatus
from waker.waker import Waker

router = APIRouter()


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
    caller = _caller(request)
    described = _waker(request).describe()
    statuses = {s.name: s for s in described.models}
    created = request.app.state.created
    # A key sees only the models it may use.
    data = [_model_entry(name, statuses[target], created, described.now) for name, target in described.routes.items()
            if target in statuses and caller.may_use(name, target)]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    caller = _caller(request)
    described = _waker(request).describe()
    target = described.routes.get(model_id)
    if target is None or not caller.may_use(model_id, target):
        raise ApiError(404, f"The model '{model_id}' does not exist", code="model_not_found", param="model")
    status = described.model(target)
    return JSONResponse(_model_entry(model_id, status, request.app.state.created, described.now))


@router.get("/health")
async def health() -> dict[str, str]:
    """The gateway itself is up (models may be cold: that is normal)."""
    return {"status": "ok"}


