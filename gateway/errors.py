"""Every error the gateway returns, in OpenAI's shape, mapped in this one place."""

import json
from dataclasses import dataclass

from waker.config.durations import format_duration
from waker.errors import ModelNotFound, NoRoom, QueueFull, ShuttingDown, StartFailed, StartTimeout, WakerError


@dataclass(eq=False)  # not frozen: frameworks set __traceback__ on exceptions they handle
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None

    def body(self) -> bytes:
        payload = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return json.dumps(payload).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        return headers

    def sse_event(self) -> bytes:
        """The same error as an SSE event, for a stream whose 200 status is already sent."""
        return b"data: " + self.body() + b"\n\n"


def bad_json(detail: str) -> ApiError:
    return ApiError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")


def invalid_type(field: str, expected: str, value: object) -> ApiError:
    """A body field of the wrong JSON type, in the words and code OpenAI's API uses for it."""
    got = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
           dict: "an object"}.get(type(value), "another type")
    return ApiError(400, f"Invalid type for '{field}': expected {expected}, but got {got} instead.",
                    code="invalid_type", param=field)


def missing_model() -> ApiError:
    return ApiError(400, "The request body must name a model (a string field 'model').",
                    code="missing_model", param="model")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than the gateway's limit of {limit} bytes.",
                    code="request_too_large")


def unauthorized() -> ApiError:
    return ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def forbidden(model: str) -> ApiError:
    return ApiError(403, f"This API key may not use the model '{model}'.", code="model_not_allowed",
                    param="model")


def metrics_key_required() -> ApiError:
    return ApiError(401, "Metrics need a key: the admin key, or a client key with \"metrics\": true "
                    "(send 'Authorization: Bearer <key>').", code="metrics_key_required")


def metrics_not_allowed() -> ApiError:
    return ApiError(403, "This API key may not read metrics (\"metrics\": true in its entry allows it).",
                    code="metrics_not_allowed")


def host_not_allowed(host: str) -> ApiError:
    return ApiError(403, f"This gateway does not answer to the host '{host[:100]}': add the name to the "
                    "allowed_hosts setting (SPARKGATE_ALLOWED_HOSTS).", code="host_not_allowed")


def origin_not_allowed(origin: str) -> ApiError:
    return ApiError(403, f"Requests from the web origin '{origin[:100]}' are refused: add it to the cors_origins "
                    "setting (SPARKGATE_CORS_ORIGINS) to let a page there call the gateway.",
                    code="origin_not_allowed")


def json_required() -> ApiError:
    return ApiError(403, "Request bodies must be JSON (Content-Type: application/json) on a gateway without "
                    "API keys: a web page can send other types without asking first.", code="json_required")


def headers_too_large(limit: int) -> ApiError:
    return ApiError(431, f"The request headers are larger than the gateway's limit of {limit} bytes.",
                    code="headers_too_large")


def request_timeout(seconds: float) -> ApiError:
    return ApiError(504, f"The request took longer than the gateway's request_timeout of "
                    f"{format_duration(seconds)}.", type="upstream_error", code="request_timeout")


def upstream_unreachable(model: str, detail: str) -> ApiError:
    return ApiError(502, f"The engine for '{model}' could not be reached or broke off: {detail}",
                    type="upstream_error", code="bad_gateway")


def upstream_connect_timeout(model: str, seconds: float) -> ApiError:
    return ApiError(504, f"The engine for '{model}' did not accept a connection within {format_duration(seconds)}.",
                    type="upstream_error", code="gateway_timeout")


def upstream_timeout(model: str, seconds: float) -> ApiError:
    return ApiError(504, f"The engine for '{model}' sent nothing for {format_duration(seconds)}.",
                    type="upstream_error", code="gateway_timeout")


def from_waker(exc: WakerError) -> ApiError:
    if isinstance(exc, ModelNotFound):
        return ApiError(404, exc.message, code="model_not_found", param="model")
    if isinstance(exc, QueueFull):
        return ApiError(429, exc.message, type="rate_limit_error", code="queue_full", retry_after=5)
    if isinstance(exc, NoRoom):
        return ApiError(503, exc.message, type="server_error", code="no_room",
                        retry_after=exc.retry_after if exc.retry_after else 10)
    if isinstance(exc, ShuttingDown):
        return ApiError(503, exc.message, type="server_error", code="shutting_down", retry_after=5)
    if isinstance(exc, StartFailed):
        message = exc.message
        if exc.log_tail:
            message += "\nLast engine output:\n" + "\n".join(exc.log_tail)
        code = "model_start_timeout" if isinstance(exc, StartTimeout) else "model_start_failed"
        # No backoff yet (a first failure): the next request starts it again at once.
        return ApiError(503, message, type="server_error", code=code,
                        retry_after=exc.retry_after if exc.retry_after else 1)
    return ApiError(503, exc.message, type="server_error", code="unavailable", retry_after=5)
