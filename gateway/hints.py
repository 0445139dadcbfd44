"""How long a request should wait for its model, and how long its client will wait: the two numbers that let the
gateway answer at once when a client would only time out.

**The expected wait** (`expected_wait`) comes from the read model: the model's own latest starts (or wakes), their
median (`ModelStatus.typical_start_s`, `typical_wake_s`, kept by its controller), less what a start under way has
already taken; and, for a model queued for memory, the typical starts of the models queued ahead of it on that node,
which start first. Rough on purpose: the drain of a busy model it waits behind is not counted (nobody knows when its
streams end), nor the stop of an idle one (seconds). A model that never started here has no estimate (None): nothing
is promised and nothing is refused on a guess.

**The client's timeout** (`client_timeout`) is what its OpenAI SDK announces with every request: the Python SDK sends
`x-stainless-read-timeout` (seconds, its read timeout: httpx applies it to every read, so a non-streaming answer must
start within it), the Node SDK `X-Stainless-Timeout` (whole seconds, `Math.trunc(timeout / 1000)`: for a non-streaming
request it covers the whole answer; Continue's chat `requestOptions.timeout` in seconds is read there as milliseconds,
so `1800` arrives as "1"). Other clients send neither, and are never refused for it.

A non-streaming request to a model that is not ready, whose expected wait exceeds its client's timeout, gets a 503 at
once (gateway/errors.py `client_would_time_out`: Retry-After min(59 s, the wait), `x-should-retry: true`) instead of a
timeout the SDK retries blind at once; its model's start is begun or joined all the same (`Warmer`, as the admin API's
start does), so the retry finds it up or nearly. Streaming requests are never refused: their 200 goes out at once and
comments keep a read timeout alive (gateway/proxy.py `_Request._acquire`).
"""

import asyncio
import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from waker.errors import WakerError
from waker.gate import Gate
from waker.state import ModelState
from waker.status import ModelStatus, WakerStatus

S = ModelState
log = logging.getLogger("sparkgate.proxy")

# The SDKs' timeout headers, as ASGI gives them (lower case): Python (seconds, a float), Node (whole seconds).
TIMEOUT_HEADERS = (b"x-stainless-read-timeout", b"x-stainless-timeout")


@dataclass(frozen=True, slots=True)
class ClientTimeout:
    """How long the client waits for an answer, in seconds, and the header that said so."""

    seconds: float
    header: str


def client_timeout(headers: Iterable[tuple[bytes, bytes]]) -> ClientTimeout | None:
    """The shortest timeout the request's SDK headers announce; None without one (or with nonsense: not a number,
    negative, nan, inf)."""
    found: ClientTimeout | None = None
    for name, value in headers:
        if name not in TIMEOUT_HEADERS:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0 and (found is None or seconds < found.seconds):
            found = ClientTimeout(seconds, name.decode("latin-1"))
    return found


def expected_wait(described: WakerStatus, model: str) -> float | None:
    """Seconds until `model` (a name or alias) should be READY for a request that asks now; 0 when it is, None when
    its history can't tell (see the module docstring)."""
    status = described.model(model)
    wait = own_wait(status, described.now)
    if wait is None or status.admission.outcome != "queued":
        return wait
    for name in status.admission.waiting_for:
        try:
            other = described.model(name)
        except KeyError:
            continue
        if other.admission.outcome == "queued" and other.admission.node == status.admission.node:
            wait += own_wait(other, described.now) or 0.0  # an ahead model with no history adds nothing known
    return wait


def own_wait(status: ModelStatus, now: float) -> float | None:
    """Seconds until the model's own start or wake should be done, counted from `now`; None without history."""
    state = status.state
    if state is S.READY:
        return 0.0
    if state in (S.WAKING, S.SLEEPING):
        typical = status.typical_wake_s
    else:  # STARTING, or a start still to come (STOPPED, FAILED, STOPPING)
        typical = status.typical_start_s
    if typical is None:
        return None
    if state in (S.STARTING, S.WAKING):
        return max(0.0, typical - (now - status.since))
    return typical


class Warmer:
    """Starts (or wakes) models for requests that were answered at once instead of waiting: one background warm per
    model at a time, through admission like a request (`Gate.warm`: it counts as waiting until the model is up, so
    no model queued for its memory evicts it in between), and ended by the gateway's shutdown like every waiter."""

    def __init__(self) -> None:
        self._warming: dict[str, asyncio.Task[None]] = {}

    def warm(self, gate: Gate) -> "asyncio.Task[None]":
        """The warm under way for `gate`'s model, or a new one; its first step runs at the next turn of the loop
        (a refusal at once, such as a failed model's backoff, ends it there)."""
        name = gate.spec.name
        task = self._warming.get(name)
        if task is None or task.done():
            task = asyncio.create_task(gate.warm(), name=f"warm {name} for a client that could not wait")
            self._warming[name] = task
            task.add_done_callback(functools.partial(self._ended, name))
        return task

    def _ended(self, name: str, task: "asyncio.Task[None]") -> None:
        if self._warming.get(name) is task:
            del self._warming[name]
        if task.cancelled():
            return
        error = task.exception()  # read, so asyncio never reports it as unretrieved
        if error is not None and not isinstance(error, WakerError):  # a refusal or a failed start is in the state
            log.error("warming %s for a client that could not wait failed", name, exc_info=error)


__all__ = ["ClientTimeout", "Warmer", "client_timeout", "expected_wait", "own_wait"]
