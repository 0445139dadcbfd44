"""Background tasks (gateway/tasks.py): which requests are tasks, where one goes, and that deciding starts nothing.

The rules and `decide` are pure and tested as tables; `TaskGuard.route` runs over a real Waker on fake engines with a
fake clock (as tests/unit/gateway/test_metrics.py builds it), so "starts nothing" is read from the waker's own events.
The same pattern over HTTP with real engine processes is tests/integration/test_background_tasks.py."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.auth import ApiKeySpec, Caller, KeyRing
from gateway.errors import ApiError
from gateway.metrics import Metrics
from gateway.settings import GatewaySettings
from gateway.tasks import Decision, TaskGuard, TaskRules, decide, header_says_yes, last_user_text, why_not
from tests.fakes import FakeEngineApi, FakeRuntime
from waker.clock import FakeClock
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.waker import Waker

OPEN_WEBUI_TITLE = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
                    "### Guidelines:\n- ...\n### Chat History:\n<chat_history>\nUSER: hi\n</chat_history>")
ANYONE = Caller("laptop", ("*",))


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "big", "messages": list(messages)}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- what is a task ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "expected"), [
    (chat(user(OPEN_WEBUI_TITLE)), "prefix"),
    (chat(user("\n\n  " + OPEN_WEBUI_TITLE)), "prefix"),  # whitespace before the prefix
    (chat(user([{"type": "text", "text": OPEN_WEBUI_TITLE}])), "prefix"),  # text parts
    (chat(user([{"type": "image_url", "image_url": {"url": "data:"}}, {"type": "text", "text": OPEN_WEBUI_TITLE}])),
     "prefix"),  # the first text part, after an image
    # the tags/follow-up shape some versions send: the history, then the task as the last user message
    (chat({"role": "system", "content": "Be brief."}, user("Explain unified memory."),
          {"role": "assistant", "content": "It is shared."}, user(OPEN_WEBUI_TITLE)), "prefix"),
    (chat(user(OPEN_WEBUI_TITLE), {"role": "assistant", "content": "{"}), "prefix"),  # last *user* message
    (chat(user(OPEN_WEBUI_TITLE), {"role": "assistant", "content": "ok"}, user("Now tell me more.")), None),
    (chat(user("Please write: ### Task: one")), None),  # only at the start
    (chat(user("### task: lower case")), None),  # the prefix as configured, exactly
    (chat({"role": "system", "content": OPEN_WEBUI_TITLE}, user("hi")), None),  # not a user message
    (chat(user(None)), None),
    (chat(user(42)), None),
    ({"model": "big", "messages": "### Task:"}, None),
    ({"model": "big"}, None),
    (chat("not a message", user(OPEN_WEBUI_TITLE)), "prefix"),
])
def test_the_prefix_rule_reads_the_last_user_message(payload: dict[str, Any], expected: str | None) -> None:
    assert TaskRules().rule(ANYONE, [], "/chat/completions", False, payload) == expected


def test_the_prefix_rule_reads_only_non_streaming_chat_completions() -> None:
    task = chat(user(OPEN_WEBUI_TITLE))
    rules = TaskRules()
    assert rules.rule(ANYONE, [], "/chat/completions", True, task) is None  # the answer a user waits for
    assert rules.rule(ANYONE, [], "/completions", False, {"model": "big", "prompt": OPEN_WEBUI_TITLE}) is None
    assert rules.rule(ANYONE, [], "/embeddings", False, task) is None
    assert TaskRules(prefixes=()).rule(ANYONE, [], "/chat/completions", False, task) is None  # [] turns it off
    custom = TaskRules(prefixes=("[bg]", "### Task:"))
    assert custom.rule(ANYONE, [], "/chat/completions", False, chat(user("[bg] summarise"))) == "prefix"


def test_a_prefix_behind_a_mile_of_whitespace_is_not_searched_for() -> None:
    assert last_user_text(chat(user(" " * 5000 + OPEN_WEBUI_TITLE))) is not None
    assert TaskRules().rule(ANYONE, [], "/chat/completions", False, chat(user(" " * 5000 + OPEN_WEBUI_TITLE))) is None


@pytest.mark.parametrize(("value", "yes"), [
    (b"title_generation", True), (b"1", True), (b"true", True), (b"yes", True),
    (b"", False), (b"  ", False), (b"0", False), (b"false", False), (b"False", False), (b"no", False),
    (b"off", False), (b"{{TASK}}", False),  # an Open WebUI too old to fill its placeholder marks nothing
])
def test_the_header_rule_needs_a_value_that_says_yes(value: bytes, yes: bool) -> None:
    assert header_says_yes(value) is yes
    rules = TaskRules(prefixes=(), header=b"x-openwebui-task")
    headers = [(b"content-type", b"application/json"), (b"x-openwebui-task", value)]
    # any path, streaming or not: the client said so
    assert rules.rule(ANYONE, headers, "/embeddings", True, {"model": "big"}) == ("header" if yes else None)


def test_the_header_rule_is_off_unless_configured_and_names_are_matched_lower_case() -> None:
    headers = [(b"x-sparkgate-task", b"1")]
    assert TaskRules().rule(ANYONE, headers, "/chat/completions", True, chat(user("hi"))) is None
    settings = GatewaySettings(task_header="X-Sparkgate-Task")
    assert TaskRules.from_settings(settings).header == b"x-sparkgate-task"
    assert TaskRules.from_settings(settings).rule(ANYONE, headers, "/chat/completions", True, chat()) == "header"


def test_the_key_rule_makes_every_request_of_the_key_a_task() -> None:
    ring = KeyRing([ApiKeySpec(key="k-tasks-123", name="owui-tasks", tasks=True), ApiKeySpec(key="k-chat-123")])
    tasks, chats = ring.caller("Bearer k-tasks-123"), ring.caller("Bearer k-chat-123")
    assert tasks is not None and tasks.tasks and chats is not None and not chats.tasks
    rules = TaskRules()
    assert rules.rule(tasks, [], "/embeddings", True, {"model": "big"}) == "key"
    assert rules.rule(chats, [], "/embeddings", True, {"model": "big"}) is None


def test_settings_refuse_a_prefix_that_would_match_every_chat() -> None:
    assert GatewaySettings().task_prefixes == ["### Task:"]
    assert GatewaySettings().task_model is None and GatewaySettings().task_header is None
    assert GatewaySettings(task_prefixes=["  ### Task: "]).task_prefixes == ["### Task:"]
    for blank in ([""], ["   "]):
        with pytest.raises(ValidationError):
            GatewaySettings(task_prefixes=blank)
    with pytest.raises(ValidationError):
        GatewaySettings(task_header="x task")


# -- where a task goes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "task_model", "task", "allowed", "expected"), [
    (None, None, None, True, Decision("serve")),
    (None, "small", "stopped", False, Decision("serve")),  # a model that can take it serves it, whatever else
    ("stopped", "small", None, True, Decision("route", "stopped")),
    ("sleeping", "small", None, True, Decision("route", "sleeping")),
    ("stopped", None, None, True, Decision("refuse", "stopped; no task_model is set")),
    ("stopped", "small", None, False, Decision("refuse", "stopped; this key may not use the task model 'small'")),
    ("starting", "small", "stopped", True, Decision("refuse", "starting; the task model 'small' is stopped")),
    ("stopped", "small", "stopped", False, Decision("refuse", "stopped; this key may not use the task model "
                                                              "'small'")),  # its state is not told to that key
])
def test_where_a_task_goes(target: str | None, task_model: str | None, task: str | None, allowed: bool,
                           expected: Decision) -> None:
    assert decide(target, task_model, task, allowed) == expected


def test_only_a_chat_completion_goes_to_the_task_model() -> None:
    # an embedding, a transcription or a FIM prompt templated for the named model means nothing to a small chat model
    assert decide("stopped", "small", None, True, chat=False) == Decision(
        "refuse", "stopped; only chat completions go to a task model")
    assert decide(None, "small", None, True, chat=False) == Decision("serve")


def spec(name: str, gb: float, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "command": ["x"], "memory_gb": gb, "min_uptime": 0, **fields})


@asynccontextmanager
async def waker_with(*specs: ModelSpec, capacity: float = 100) -> AsyncIterator[Waker]:
    runtime = FakeRuntime()
    waker = Waker(Registry(list(specs)), runtimes={RuntimeKind.PROCESS: runtime},
                  budgets={"local": Budget(capacity, 0)}, probes={"local": FixedProbe(None)}, clock=FakeClock(),
                  engine_api=FakeEngineApi(runtime))
    async with waker:
        yield waker


def starts(waker: Waker) -> list[str]:
    return [e.model for e in waker.events.recent() if e.kind == "transition" and e.target == "starting"]


async def test_a_task_for_a_stopped_model_starts_nothing_and_is_refused_without_a_task_model() -> None:
    async with waker_with(spec("big", 80), spec("small", 10)) as w:
        guard = TaskGuard(TaskRules(), None, w)
        with pytest.raises(ApiError) as refused:
            guard.route("prefix", w.resolve("big"), w.gate("big"), ANYONE)
        error = refused.value
        assert (error.status, error.code, error.type) == (503, "model_not_ready_for_task", "server_error")
        assert "'big' is stopped; no task_model is set" in error.message
        assert (b"x-should-retry", b"false") in error.headers()
        assert not any(name == b"retry-after" for name, _ in error.headers())  # no reason to come back soon
        await asyncio.sleep(0)
        assert starts(w) == [] and w.controller("big").state == "stopped"
        event = w.events.recent()[-1]
        assert (event.kind, event.model, event.data) == ("task_refused", "big", {"rule": "prefix", "task_model": None})


async def test_a_task_goes_to_the_task_model_when_its_own_model_is_cold_and_to_its_own_when_ready() -> None:
    async with waker_with(spec("big", 80), spec("small", 10, aliases=["utility"])) as w:
        await w.warm("small")
        guard = TaskGuard(TaskRules(), "utility", w)  # an alias names the task model too
        routed, gate = guard.route("prefix", w.resolve("big"), w.gate("big"), ANYONE)
        assert routed.name == "small" and gate is w.gate("small")
        assert w.events.recent()[-1].kind == "task_routed" and w.events.recent()[-1].model == "big"
        await w.warm("big")
        served, gate = guard.route("prefix", w.resolve("big"), w.gate("big"), ANYONE)
        assert served.name == "big" and gate is w.gate("big")
        assert starts(w) == ["small", "big"]  # each by its warm(), none by a task


async def test_the_task_model_is_refused_when_cold_unknown_or_not_the_keys() -> None:
    async with waker_with(spec("big", 80), spec("small", 10)) as w:
        big = w.resolve("big")
        with pytest.raises(ApiError, match="the task model 'small' is stopped"):
            TaskGuard(TaskRules(), "small", w).route("prefix", big, w.gate("big"), ANYONE)
        with pytest.raises(ApiError, match=r"the task model 'gone' is not in models\.d"):
            TaskGuard(TaskRules(), "gone", w).route("prefix", big, w.gate("big"), ANYONE)
        await w.warm("small")
        with pytest.raises(ApiError, match="this key may not use the task model 'small'"):
            TaskGuard(TaskRules(), "small", w).route("key", big, w.gate("big"), Caller("only-big", ("big",)))
        with pytest.raises(ApiError, match="only chat completions go to a task model"):
            TaskGuard(TaskRules(), "small", w).route("key", big, w.gate("big"), ANYONE, "/embeddings")
        assert starts(w) == ["small"]


async def test_a_draining_or_full_model_takes_no_task() -> None:
    async with waker_with(spec("big", 80, max_concurrent=1), spec("small", 10)) as w:
        await w.warm("big")
        gate = w.gate("big")
        assert why_not(gate, w.scheduler.seats["big"]) is None
        async with gate.slot():  # its one max_concurrent place taken: a task would have to wait
            assert why_not(gate, w.scheduler.seats["big"]) == "busy (all 1 of its max_concurrent places are taken)"
        w.scheduler.seats["big"].drains["local"] = w.clock.now() + 60  # another model waits for its memory
        assert why_not(gate, w.scheduler.seats["big"]) == "draining (another model waits for its memory)"
        w.scheduler.seats["big"].drains.clear()
        assert why_not(gate, w.scheduler.seats["big"]) is None


async def test_routed_and_refused_tasks_are_counted_by_model_and_outcome() -> None:
    async with waker_with(spec("big", 80), spec("small", 10)) as w:
        metrics = Metrics(w)
        follow = asyncio.create_task(metrics.follow())
        await w.warm("small")
        TaskGuard(TaskRules(), "small", w).route("prefix", w.resolve("big"), w.gate("big"), ANYONE)
        with pytest.raises(ApiError):
            TaskGuard(TaskRules(), None, w).route("header", w.resolve("big"), w.gate("big"), ANYONE)
        for _ in range(10):
            await asyncio.sleep(0)
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        text = metrics.render()[0].decode()
        assert 'sparkgate_background_tasks_total{model="big",outcome="routed"} 1.0' in text
        assert 'sparkgate_background_tasks_total{model="big",outcome="refused"} 1.0' in text
