"""Background tasks never wake a model: what a task is, and where one goes.

Chat front ends send small side requests besides the answer. Open WebUI sends titles, tags, follow-up suggestions,
retrieval and web-search queries and chat-input autocomplete as non-streaming chat completions whose single user
message is one of its prompt templates; every default template starts with `### Task:` (open-webui
`backend/open_webui/config.py`, DEFAULT_{TITLE,TAGS,FOLLOW_UP,QUERY,AUTOCOMPLETE}_GENERATION_PROMPT_TEMPLATE). For a
new chat the title is sent at the same moment as the answer, to the chat model unless a task model is set. Were a
task for a cold 120B model served like the answer, a title would start (or wake, or evict room for) a giant, and for
a model nobody answers with any more (tags, follow-ups, a title regenerated later) it would bring back what the idle
reaper just stopped. Nothing in the request marks it as a task: Open WebUI keeps its `metadata.task` to itself, and
sends it only where a connection's custom header carries the `{{TASK}}` placeholder
(`backend/open_webui/utils/headers.py`: "title_generation", "tags_generation"..., empty for the chat itself).

**What is a task** (`TaskRules.rule`, first match wins):
- the key rule: every request of an API key whose entry says `tasks: true`;
- the header rule: a request carrying the `task_header` setting's header with a value that says yes: anything but
  empty, "0", "false", "no", "off", or a placeholder its client left unfilled ("{{TASK}}": an Open WebUI too old to
  fill it would otherwise mark every chat);
- the prefix rule: a non-streaming `POST /v1/chat/completions` whose last user message (its string content, or its
  first text part) starts, after whitespace, with one of `task_prefixes` (default `["### Task:"]`; `[]` turns it off).
  Streaming requests and other paths skip it, and so skip reading the messages at all: the answer a user waits for
  pays nothing.

**Where a task goes** (`decide`, pure): to the model it names if that model can take it this moment; else, for a chat
completion, to `task_model` (a name or alias, usually a small pinned or preloaded model) if that one can take it this
moment and the caller's key may use it; else nowhere: a 503 `model_not_ready_for_task` at once, with
`x-should-retry: false` and no Retry-After, so the OpenAI SDKs don't retry it and Open WebUI falls back (a title
becomes the start of the message). A routed task's body names the task model's engine, and the answer is the task
model's, `model` field included: the client sees who answered.

"Can take it this moment" (`why_not`) is stricter than what an ordinary request waits for: READY, not draining (a drain
means another model waits for this one's memory), and a `max_concurrent` slot free with nobody waiting for one. That is
the whole of "lowest admission priority": a task never enters the memory admission queue (so it never starts, wakes or
evicts anything, and never holds a place another request waits behind), never waits for a start, a wake, a drain or a
slot, and never keeps a draining model busy. A task that is served counts in flight while it runs, like any request.
The decision and the lease are taken with no await in between (gateway/proxy.py `Proxy.__call__` hands the chosen gate
to `_Request`, whose READY path takes the lease at once), so the model can't stop in between and be started for it.

Each routed or refused task is an event on /admin/events, `task_routed` or `task_refused` (model: the one the task
named; reason: why it couldn't take it), counted by gateway/metrics.py as sparkgate_background_tasks_total.
Guarded by tests/integration/test_background_tasks.py and tests/unit/test_tasks.py.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.auth import Caller
from gateway.errors import ApiError
from gateway.settings import GatewaySettings
from waker.config.spec import EngineKind, ModelSpec
from waker.errors import WakerError
from waker.events import Event
from waker.gate import Gate
from waker.scheduling.seat import Seat
from waker.state import ModelState
from waker.waker import Waker

TASK_PATH = "/chat/completions"  # what follows /v1 for the prefix rule
ROUTED, REFUSED = "task_routed", "task_refused"  # event kinds
_NOT_YES = frozenset({"", "0", "false", "no", "off"})
# How much of a message's start is read for a prefix: leading whitespace beyond this never matches (a prompt of
# megabytes is not copied to find out).
_SCAN = 1024

Rule = Literal["key", "header", "prefix"]


@dataclass(frozen=True, slots=True)
class TaskRules:
    """The configured rules (see the module docstring), checked per request; no I/O."""

    prefixes: tuple[str, ...] = ("### Task:",)
    header: bytes | None = None  # lower-case, as ASGI gives header names

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "TaskRules":
        header = settings.task_header.strip().lower().encode("latin-1") if settings.task_header else None
        return cls(tuple(settings.task_prefixes), header)

    def rule(self, caller: Caller, headers: Iterable[tuple[bytes, bytes]], path: str, stream: bool,
             payload: dict[str, Any]) -> Rule | None:
        """Which rule makes this request a background task; None for an ordinary request."""
        if caller.tasks:
            return "key"
        if self.header is not None:
            for name, value in headers:
                if name == self.header and header_says_yes(value):
                    return "header"
        if stream or path != TASK_PATH or not self.prefixes:
            return None
        text = last_user_text(payload)
        if text is None:
            return None
        if text[:1].isspace():  # only then a copy of its start
            text = text[:_SCAN].lstrip()
        return "prefix" if text.startswith(self.prefixes) else None


def header_says_yes(value: bytes) -> bool:
    text = value.decode("latin-1").strip()
    return text.lower() not in _NOT_YES and not (text.startswith("{{") and text.endswith("}}"))


def last_user_text(payload: dict[str, Any]) -> str | None:
    """The text of the last user message: its content if a string, else its first text part; None if none."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    return str(part["text"])
        return None
    return None


def why_not(gate: Gate, seat: Seat | None) -> str | None:
    """None if the model can take a task this moment (see the module docstring); else why not, in words."""
    controller = gate.controller
    state = controller.state
    if state is not ModelState.READY or controller.handle is None:
        return str(state)
    if controller.retired or controller.closed:
        return "being removed"
    if seat is not None and seat.drains:
        return "draining (another model waits for its memory)"
    limiter = gate.limiter
    if limiter.limit is not None and (limiter.active >= limiter.limit or limiter.waiting):
        return f"busy (all {limiter.limit} of its max_concurrent places are taken)"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["serve", "route", "refuse"]
    why: str = ""  # why the named model can't take the task, and (refused) why the task model can't either


def decide(target: str | None, task_model: str | None, task: str | None, allowed: bool,
           chat: bool = True) -> Decision:
    """Where a task goes. `target` and `task` are `why_not` of the named model and of the task model (None: it
    can take the task now); `task_model` is the task model's name (None: not set); `allowed`: the caller's key
    may use the task model; `chat`: the task is a chat completion, the only kind a task model is given (an
    embedding, a transcription or a fill-in-the-middle prompt templated for the named model means nothing to it)."""
    if target is None:
        return Decision("serve")
    if not chat:
        return Decision("refuse", f"{target}; only chat completions go to a task model")
    if task_model is None:
        return Decision("refuse", f"{target}; no task_model is set")
    if not allowed:
        return Decision("refuse", f"{target}; this key may not use the task model '{task_model}'")
    if task is not None:
        return Decision("refuse", f"{target}; the task model '{task_model}' is {task}")
    return Decision("route", target)


def not_ready_for_task(model: str, why: str, rule: Rule) -> ApiError:
    """The refusal, with `x-should-retry: false`: the OpenAI SDKs retry a 503 unless told not to, and retrying a
    title for a stopped model only delays the client's fallback."""
    return ApiError(
        503, f"The model '{model}' is {why}. This request is a background task (the {rule} rule; "
        "docs: README.md, Background tasks), and a task never starts, wakes or waits for a model: "
        "fall back, or send it again once the model is up.", type="server_error", code="model_not_ready_for_task",
        should_retry=False)


class TaskGuard:
    """Applies the rules and the decision to one request, over the waker's gates (see the module docstring)."""

    def __init__(self, rules: TaskRules, task_model: str | None, waker: Waker) -> None:
        self.rules = rules
        self.task_model = task_model
        self._waker = waker

    @classmethod
    def from_settings(cls, settings: GatewaySettings, waker: Waker) -> "TaskGuard":
        return cls(TaskRules.from_settings(settings), settings.task_model, waker)

    def route(self, rule: Rule, spec: ModelSpec, gate: Gate, caller: Caller,
              path: str = TASK_PATH) -> tuple[ModelSpec, Gate]:
        """The model and gate that serve this task: the ones named, or the task model's; or the 503 raised."""
        seats = self._waker.scheduler.seats
        target = why_not(gate, seats.get(spec.name))
        if target is None:
            return spec, gate
        task_spec = task_gate = task_why = None
        if self.task_model is not None:
            try:
                task_spec = self._waker.resolve(self.task_model)
                task_gate = self._waker.gate(task_spec.name)
            except WakerError:
                task_why = "not in models.d"
            else:
                task_why = ("a service, not a model" if task_spec.engine is EngineKind.SERVICE
                            else why_not(task_gate, seats.get(task_spec.name)))
        name = task_spec.name if task_spec is not None else self.task_model
        allowed = task_spec is None or caller.may_use(task_spec.name)  # an unknown one is refused for that
        decision = decide(target, name, task_why, allowed, chat=path == TASK_PATH)
        if decision.action == "route":
            assert task_spec is not None and task_gate is not None
            self._emit(ROUTED, spec.name, target, rule, name)
            return task_spec, task_gate
        self._emit(REFUSED, spec.name, decision.why, rule, name)
        raise not_ready_for_task(spec.name, decision.why, rule)

    def _emit(self, kind: str, model: str, reason: str, rule: Rule, task_model: str | None) -> None:
        self._waker.events.emit(Event(self._waker.clock.wall(), model, kind, reason=reason,
                                      data={"rule": rule, "task_model": task_model}))


__all__ = ["REFUSED", "ROUTED", "Decision", "TaskGuard", "TaskRules", "decide", "header_says_yes", "last_user_text",
           "not_ready_for_task", "why_not"]
