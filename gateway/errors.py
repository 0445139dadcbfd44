"""Every error the gateway returns, in OpenAI's shape, mapped in this one place.

**Retry headers the SDKs obey.** A client's SDK, not a person, decides when to try again, so each answer says it in
the words the SDKs read (checked in their sources):

- the OpenAI Python SDK (openai-python `_base_client.py`, `_should_retry` and `_calculate_retry_timeout`) reads
  `x-should-retry` first ("true" retries, "false" never does, whatever the status), then retries 408, 409, 429 and
  every 5xx. It waits `retry-after-ms`, else `retry-after` (seconds), when 0 < x <= 120 s (v2.52 and later: above
  120 s it does not retry at all); older releases honour only x <= 60 s, and wait their own 0.5-8 s backoff otherwise;
- the OpenAI Node SDK (openai-node `src/client.ts`, `shouldRetry`, `retryRequest`) reads `x-should-retry` the same
  way and honours `retry-after-ms` / `retry-after` only when 0 < x < 60 s (strictly), else 0.5-8 s;
- the Vercel AI SDK (Cline 4.1 and later; vercel/ai `retry-with-exponential-backoff.ts`) never reads
  `x-should-retry` (it retries 408, 409, 429 and 5xx), and honours `retry-after-ms` / `retry-after` only below 60 s,
  else 2 s then 4 s.

So a retry-soon answer (`should_retry` True: no room yet, the queue full, shutting down, a start that may be tried
again within the minute, a model still starting) says `x-should-retry: true` and a Retry-After of at most
`RETRY_AFTER_CAP` (59 s: under every SDK's limit, 60 itself is too much for Node and the AI SDK), with
`retry-after-ms` for the exact wait. A deterministic answer (`should_retry` False: a failed model whose backoff is
longer than the cap, a start that timed out, the one-hour request_timeout, an engine that broke off or went silent,
every 4xx) says `x-should-retry: false`: the Python and Node SDKs raise it at once instead of repeating a wait that
can only end the same way (both retried a 504 after an hour, three times). Its Retry-After, where there is one, is the
real wait, uncapped: the SDKs that read `x-should-retry` don't retry anyway, and the AI SDK, which doesn't, takes a
value of 60 s or more for "use my own 2 s / 4 s backoff" and so fails within seconds rather than retrying after a
capped minute into the same refusal. Guarded by tests/unit/gateway/test_retry_headers.py and
tests/integration/test_waiting_experience.py.
"""

import json
import math
from dataclasses import dataclass

from waker.config.durations import format_duration
from waker.errors import ModelNotFound, NoRoom, QueueFull, ShuttingDown, StartFailed, StartTimeout, WakerError

# The longest Retry-After a retry-soon answer sends: the Node SDK and the AI SDK honour only waits below 60 s.
RETRY_AFTER_CAP = 59.0


@dataclass(eq=False)  # not frozen: frameworks set __traceback__ on exceptions they handle
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None  # seconds until a retry may succeed (the real wait; capped when sent)
    should_retry: bool | None = None  # x-should-retry: true (retry soon), false (deterministic), None (not sent)

    def __post_init__(self) -> None:
        # A 4xx other than 408, 409 and 429 is the request's own fault: the same request gets the same answer.
        if self.should_retry is None and 400 <= self.status < 500 and self.status not in (408, 409, 429):
            self.should_retry = False

    def body(self) -> bytes:
        payload = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return json.dumps(payload).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Content type, then the retry headers (see the module docstring)."""
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None and math.isfinite(self.retry_after):
            wait = max(0.0, self.retry_after)
            if self.should_retry is not False:
                wait = min(wait, RETRY_AFTER_CAP)
            # Never 0: the Node SDK and the AI SDK take 0 ms for "no value" and the Python SDK needs more than 0.
            headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
            headers.append((b"retry-after-ms", str(max(1, round(wait * 1000))).encode()))
        if self.should_retry is not None:
            headers.append((b"x-should-retry", b"true" if self.should_retry else b"false"))
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


def bad_form(detail: str) -> ApiError:
    """A multipart/form-data body the gateway can't route (gateway/forms.py)."""
    return ApiError(400, f"The request body is not a valid multipart/form-data form: {detail}.",
                    code="invalid_multipart")


def missing_form_model() -> ApiError:
    return ApiError(400, "The form must name a model (a text field 'model').", code="missing_model", param="model")


def invalid_form_boolean(field: str, value: str) -> ApiError:
    """A form field that must be a boolean: a form carries text, and OpenAI's SDKs send 'true' or 'false'."""
    return ApiError(400, f"Invalid value for '{field}': expected 'true' or 'false' in a form, got {value[:50]!r}.",
                    code="invalid_type", param=field)


def anthropic_sse_event(error: ApiError) -> bytes:
    """`error` as the SSE event Anthropic's Messages API ends a stream with (`event: error`), for a `/v1/messages`
    stream whose 200 is already sent: Anthropic's SDKs raise on that event and skip events without a name, so the
    OpenAI-style `data:` event would end the stream silently."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            503: "overloaded_error"}.get(error.status, "api_error")
    payload = {"type": "error", "error": {"type": kind, "message": error.message}}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


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
    # Not retried: a retry would wait the whole request_timeout (an hour by default) again.
    return ApiError(504, f"The request took longer than the gateway's request_timeout of "
                    f"{format_duration(seconds)}.", type="upstream_error", code="request_timeout", should_retry=False)


def upstream_unreachable(model: str, detail: str) -> ApiError:
    # Not retried: an engine that broke off mid-answer is restarted by the next request, and a request that made it
    # crash would make it crash again, three times over.
    return ApiError(502, f"The engine for '{model}' could not be reached or broke off: {detail}",
                    type="upstream_error", code="bad_gateway", should_retry=False)


def upstream_connect_timeout(model: str, seconds: float) -> ApiError:
    # Retried: nothing was sent yet, and a connection that was slow once is usually taken the next time.
    return ApiError(504, f"The engine for '{model}' did not accept a connection within {format_duration(seconds)}.",
                    type="upstream_error", code="gateway_timeout", should_retry=True)


def upstream_timeout(model: str, seconds: float) -> ApiError:
    # Not retried: a retry would wait the same upstream_read_timeout of silence again.
    return ApiError(504, f"The engine for '{model}' sent nothing for {format_duration(seconds)}.",
                    type="upstream_error", code="gateway_timeout", should_retry=False)


def client_would_time_out(model: str, expected: float, client_timeout: float, header: str) -> ApiError:
    """A request the client would give up on before its model is ready (gateway/hints.py): its start goes on, and the
    SDK is told to come back when the model should be up, instead of timing out blind and retrying at once."""
    return ApiError(503, f"The model '{model}' is starting and should be ready in about {format_duration(expected)}, "
                    f"longer than this client waits ({format_duration(client_timeout)}, its {header} header). Its "
                    "start goes on: send the request again after the Retry-After.", type="server_error",
                    code="model_not_ready", retry_after=expected, should_retry=True)


def from_waker(exc: WakerError) -> ApiError:
    """The answer to a waker error, with the retry headers of the module docstring."""
    if isinstance(exc, ModelNotFound):
        return ApiError(404, exc.message, code="model_not_found", param="model")
    if isinstance(exc, QueueFull):
        return ApiError(429, exc.message, type="rate_limit_error", code="queue_full", retry_after=5, should_retry=True)
    if isinstance(exc, NoRoom):
        return ApiError(503, exc.message, type="server_error", code="no_room",
                        retry_after=exc.retry_after if exc.retry_after else 10, should_retry=True)
    if isinstance(exc, ShuttingDown):
        return ApiError(503, exc.message, type="server_error", code="shutting_down", retry_after=5, should_retry=True)
    if isinstance(exc, StartFailed):
        message = exc.message
        if exc.log_tail:
            message += "\nLast engine output:\n" + "\n".join(exc.log_tail)
        code = "model_start_timeout" if isinstance(exc, StartTimeout) else "model_start_failed"
        # No backoff yet (a first failure): the next request starts it again at once. A backoff longer than the cap
        # can't be waited out by an SDK, and a start that timed out would make a retry wait the whole start_timeout
        # again: both are told not to retry (the message says when the next start may be tried).
        wait = exc.retry_after if exc.retry_after else 1
        retry = wait <= RETRY_AFTER_CAP and not isinstance(exc, StartTimeout)
        return ApiError(503, message, type="server_error", code=code, retry_after=wait, should_retry=retry)
    return ApiError(503, exc.message, type="server_error", code="unavailable", retry_after=5, should_retry=True)


# -- engine routes (gateway/engine_routes.py) ------------------------------------------------------------------


def invalid_engine_path(shown: str) -> ApiError:
    return ApiError(400, f"The path '{shown}' is not forwarded: engine routes are '/engines/<model>/<route>', "
                    "normalised (no '.' or '..' segments, empty segments, encoded dots, slashes or backslashes, "
                    "backslashes or control characters).", code="invalid_path")


def engine_path_names_no_model(shown: str) -> ApiError:
    return ApiError(404, f"The path '{shown}' names no model: engine routes are '/engines/<model>/<route>', with a "
                    "model's name or alias.", code="model_not_found", param="model")


def engine_route_not_found(model: str, engine: str, route: str, allowed: list[str]) -> ApiError:
    """A route the model's engine adapter does not declare: an allow-list (waker/engines/base.py EngineRoute)."""
    if not allowed:
        return ApiError(404, f"'{route[:200]}' is not forwarded: the gateway forwards none of a {engine} engine's own "
                        f"routes (model '{model}').", code="engine_route_not_found")
    return ApiError(404, f"'{route[:200]}' is not one of the {engine} engine routes the gateway forwards for "
                    f"'{model}': {', '.join(allowed)}.", code="engine_route_not_found")


def engine_route_method_not_allowed(method: str, route: str, allowed: list[str]) -> ApiError:
    return ApiError(405, f"{method[:20]} {route} is not forwarded; this route takes {', '.join(allowed)}.",
                    code="method_not_allowed")


def model_not_running(model: str, state: str, route: str) -> ApiError:
    """A route that reads a running engine, for a model that is not ready: it starts nothing (and it is not retried:
    the model stays as it is until someone uses it)."""
    return ApiError(503, f"The model '{model}' is {state}, not running: {route} reads a running engine and starts "
                    "nothing. Use the model (a request, or a route that asks the model something) to start it.",
                    type="server_error", code="model_not_running", should_retry=False)


def engine_route_model_mismatch(named: str, model: str) -> ApiError:
    return ApiError(400, f"The body names the model '{named[:200]}', but the route is for '{model}'.",
                    code="model_mismatch", param="model")


def engine_answer_too_large(model: str, limit: int) -> ApiError:
    return ApiError(502, f"The engine for '{model}' answered more than the {limit} bytes an engine route may return.",
                    type="upstream_error", code="bad_gateway", should_retry=False)


def engine_answer_unchecked(model: str, route: str) -> ApiError:
    """A route whose answer must lose its secrets (EngineRoute.redact) answered something that is not a JSON object."""
    return ApiError(502, f"The engine for '{model}' answered {route} with something other than a JSON object; it is "
                    "not passed on, since the keys it may hold could not be removed.", type="upstream_error",
                    code="bad_gateway", should_retry=False)


def service_not_a_model(name: str) -> ApiError:
    """A `/v1` request naming a service: it has no OpenAI routes, so nothing is started for it."""
    return ApiError(404, f"{name} is a service, not a model: reach it under /services/{name}/",
                    type="invalid_request_error", code="model_not_found", param="model")
