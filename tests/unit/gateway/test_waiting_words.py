"""What a waiting request is told, from the read model alone (gateway/hints.py, gateway/progress.py): the expected
wait from the model's own start history and the queue ahead; the client's timeout from its SDK's headers; the phase of
the wake in words, with the queue position and an estimate; and the chunks in the two opt-in styles, parsed the way
their readers parse them. These modules are new: every test here fails on the code before them (ImportError)."""

import json
from typing import Any

import pytest

from gateway import hints, progress
from waker.config.spec import ModelSpec, Progress
from waker.state import ModelState
from waker.status import Admission, ModelStatus, WakerStatus

S = ModelState
NOW = 1000.0


class Engine:
    """An engine that exists (all the phases look at)."""

    ident = "e1"


def model(name: str, state: S, since: float = NOW, *, start: float | None = None, wake: float | None = None,
          engine: bool = False, admission: Admission | None = None, docker: bool = False) -> ModelStatus:
    fields: dict[str, Any] = {"name": name, "runtime": "docker", "image": "vllm/vllm-openai"} if docker else {
        "name": name, "command": ["engine"]}
    return ModelStatus(name=name, spec=ModelSpec.model_validate(fields), state=state, since=since,
                       engine=Engine() if engine else None, admission=admission or Admission(),  # type: ignore[arg-type]
                       typical_start_s=start, typical_wake_s=wake)


def world(*models: ModelStatus) -> WakerStatus:
    return WakerStatus(now=NOW, models=models, nodes=(), routes={m.name: m.name for m in models})


def queued(position: int, *behind: str) -> Admission:
    return Admission(outcome="queued", node="local", position=position, waiting_for=behind)


# -- the expected wait -----------------------------------------------------------------------------------------


def test_the_expected_wait_is_the_models_own_history_less_what_its_start_has_taken() -> None:
    assert hints.expected_wait(world(model("m", S.READY, start=60)), "m") == 0
    assert hints.expected_wait(world(model("m", S.STOPPED, start=60)), "m") == 60
    assert hints.expected_wait(world(model("m", S.FAILED, start=60)), "m") == 60
    assert hints.expected_wait(world(model("m", S.STARTING, since=NOW - 20, start=60)), "m") == 40
    assert hints.expected_wait(world(model("m", S.STARTING, since=NOW - 90, start=60)), "m") == 0  # overdue
    assert hints.expected_wait(world(model("m", S.SLEEPING, start=60, wake=8)), "m") == 8
    assert hints.expected_wait(world(model("m", S.WAKING, since=NOW - 3, start=60, wake=8)), "m") == 5


def test_a_model_that_never_started_here_has_no_estimate() -> None:
    assert hints.expected_wait(world(model("m", S.STOPPED)), "m") is None
    assert hints.expected_wait(world(model("m", S.STARTING, since=NOW - 5)), "m") is None
    assert hints.expected_wait(world(model("m", S.SLEEPING, start=60)), "m") is None  # a wake is not a start


def test_a_queued_model_also_waits_for_the_starts_queued_ahead_of_it() -> None:
    described = world(model("small", S.STOPPED, start=20, admission=queued(1, "busy")),
                      model("big", S.STOPPED, start=100, admission=queued(2, "small", "busy")),
                      model("busy", S.READY, start=50))
    assert hints.expected_wait(described, "big") == 100 + 20  # the holder's drain is not counted
    assert hints.expected_wait(described, "small") == 20


@pytest.mark.parametrize(("headers", "seconds", "header"), [
    ([(b"x-stainless-read-timeout", b"2.0")], 2.0, "x-stainless-read-timeout"),  # the Python SDK
    ([(b"x-stainless-timeout", b"600")], 600.0, "x-stainless-timeout"),  # the Node SDK
    ([(b"x-stainless-timeout", b"1"), (b"x-stainless-read-timeout", b"30")], 1.0, "x-stainless-timeout"),
    ([(b"x-stainless-timeout", b"0")], 0.0, "x-stainless-timeout"),  # Node, a timeout under a second
])
def test_the_clients_timeout_is_read_from_its_sdks_headers(headers: list[tuple[bytes, bytes]], seconds: float,
                                                           header: str) -> None:
    assert hints.client_timeout(headers) == hints.ClientTimeout(seconds, header)


@pytest.mark.parametrize("value", [b"", b"soon", b"-1", b"nan", b"inf"])
def test_a_timeout_header_that_says_nothing_usable_is_ignored(value: bytes) -> None:
    assert hints.client_timeout([(b"x-stainless-read-timeout", value), (b"user-agent", b"OpenAI/Python")]) is None


# -- the phase in words ----------------------------------------------------------------------------------------


def test_the_phases_of_a_wake_in_words() -> None:
    def words(*models: ModelStatus) -> str:
        return progress.phase(world(*models), models[0].name).words

    assert words(model("big", S.STOPPED, admission=queued(1, "coder")), model("coder", S.READY)) == \
        "waiting for memory behind coder (#1 in the queue)"
    assert words(model("big", S.STOPPED, admission=queued(2, "small", "coder")), model("small", S.STOPPED),
                 model("coder", S.READY)) == "waiting for memory behind small, coder (#2 in the queue)"
    assert words(model("big", S.STOPPED, admission=queued(1, "coder")), model("coder", S.STOPPING)) == \
        "evicting coder to make room"
    assert words(model("big", S.STARTING, docker=True)) == "creating the container"
    assert words(model("big", S.STARTING)) == "launching the engine"
    assert words(model("big", S.STARTING, engine=True)) == "loading the model"
    assert words(model("big", S.WAKING, engine=True)) == "waking from sleep"
    assert words(model("big", S.STOPPING, engine=True)) == "waiting for its previous engine to stop"
    assert words(model("big", S.READY, engine=True)) == "ready"


def test_the_line_shows_the_time_waited_and_the_estimate_from_the_models_history() -> None:
    described = world(model("gpt-oss-120b", S.STOPPED, start=140, admission=queued(1, "qwen3-coder")),
                      model("qwen3-coder", S.READY))
    _, text = progress.line(described, "gpt-oss-120b", waited=40)
    assert text == "Waking gpt-oss-120b: waiting for memory behind qwen3-coder (#1 in the queue), 40 s of ~3 min"
    _, first = progress.line(world(model("m", S.STARTING, engine=True)), "m", waited=12)
    assert first == "Waking m: loading the model, 12 s"  # never started here: no estimate
    _, late = progress.line(world(model("m", S.STARTING, since=NOW - 100, start=60, engine=True)), "m", waited=100)
    assert late == "Waking m: loading the model, 2 min, longer than usual"


# -- the chunks --------------------------------------------------------------------------------------------------


def open_webui_events(raw: bytes) -> list[dict[str, Any]]:
    """What Open WebUI's stream handler hands its event emitter: lines starting `data:`, JSON, their `event`
    (open-webui backend/open_webui/utils/middleware.py, stream_body_handler)."""
    events = []
    for line in raw.decode().splitlines():
        if not line.startswith("data:"):
            continue
        data = json.loads(line[len("data:"):].strip())
        if "event" in data:
            assert "choices" not in data  # skipped by its choices handling, added to nothing
            events.append(data["event"])
    return events


def test_open_webui_progress_is_a_status_line_updated_on_a_new_phase_and_hidden_at_the_end() -> None:
    reporter = progress.Reporter(Progress.OPEN_WEBUI, "big", "big-served", refresh=10, arrived=NOW)
    starting = world(model("big", S.STARTING, engine=False))
    first = reporter.update(starting, now=NOW + 1)
    assert open_webui_events(first) == [{"type": "status", "data": {"description": "Waking big: launching the engine, "
                                                                                    "1 s", "done": False}}]
    assert reporter.update(starting, now=NOW + 2) == b""  # same phase, not yet refresh-old
    loading = world(model("big", S.STARTING, engine=True))
    [event] = open_webui_events(reporter.update(loading, now=NOW + 3))  # a new phase: at once
    assert event["data"]["description"] == "Waking big: loading the model, 3 s"
    assert reporter.update(loading, now=NOW + 12) == b""
    [event] = open_webui_events(reporter.update(loading, now=NOW + 13.5))  # refreshed with the time waited
    assert event["data"]["description"] == "Waking big: loading the model, 14 s"
    assert open_webui_events(reporter.done(now=NOW + 20)) == [
        {"type": "status", "data": {"description": "big is ready", "done": True, "hidden": True}}]


def test_reasoning_progress_is_ordinary_chat_chunks_with_reasoning_content() -> None:
    reporter = progress.Reporter(Progress.REASONING, "big", "big-served", refresh=10, arrived=NOW)
    chunks = [reporter.update(world(model("big", S.STARTING, engine=True)), now=NOW + 5), reporter.done(now=NOW + 61)]
    payloads = [json.loads(c.decode().removeprefix("data: ")) for c in chunks]
    assert all(c.endswith(b"\n\n") and c.startswith(b"data: ") for c in chunks)
    for payload in payloads:
        assert payload["object"] == "chat.completion.chunk" and payload["model"] == "big-served"
        assert len(payload["choices"]) == 1 and payload["choices"][0]["finish_reason"] is None
        assert "content" not in payload["choices"][0]["delta"]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant",
                                                  "reasoning_content": "Waking big: loading the model, 5 s\n"}
    assert payloads[1]["choices"][0]["delta"] == {"reasoning_content": "big is ready after 61 s.\n\n"}


def test_progress_is_opt_in_by_key_or_model_and_for_streaming_chat_completions_only() -> None:
    assert progress.choose(None, None) is Progress.OFF
    assert progress.choose(None, Progress.REASONING) is Progress.REASONING
    assert progress.choose(Progress.OPEN_WEBUI, Progress.REASONING) is Progress.OPEN_WEBUI  # the key wins
    assert progress.choose(Progress.OFF, Progress.OPEN_WEBUI) is Progress.OFF
    assert progress.applies("/chat/completions", stream=True)
    assert not progress.applies("/chat/completions", stream=False)
    assert not progress.applies("/completions", stream=True)  # Continue's autocomplete: never
    assert not progress.applies("/embeddings", stream=True)
    assert progress.keepalive("big", 4.6) == b": waking big (5s)\n\n"
