"""What a streaming request sees while its model wakes: SSE comments always, and, opted in, the wake itself.

**Comments** (`keepalive`): `: waking <model> (<waited>s)`. Every SSE parser skips lines that start with ":" (the
OpenAI SDKs, Open WebUI, Continue, the AI SDK), and the bytes keep read and idle timeouts alive.

**Progress**, opt-in (`choose`: an API key's `progress` wins over the model's models.d `progress`; default off), and
only for `POST /v1/chat/completions` with `stream: true` (`applies`): never for /v1/completions (Continue's
autocomplete would insert the words into the code), embeddings or non-streaming answers, and never for a client that
did not opt in: a chunk without `choices` breaks strict parsers (the AI SDK's chunk schema), and reasoning text is
sent back by some clients. Two styles:

- `open-webui`: Open WebUI's own status line. Its stream handler passes a chunk's `event` to its event emitter before
  it looks at `choices`, and skips a chunk without `choices` after that (open-webui
  `backend/open_webui/utils/middleware.py`, stream_body_handler: `if "event" in data: await
  event_emitter(data.get("event", {}))`, then `if not choices: ... continue`). So a chunk `{"event": {"type":
  "status", "data": {"description": ..., "done": false}}}` shows as the status line above the answer, and adds
  nothing to the answer or to the reasoning. At the first engine byte (or the error that ends the wait) a last status
  says `done: true, hidden: true` ("<model> is ready"; "<model> could not be woken" above an error). Open WebUI
  stores every status of a message (backend/open_webui/socket/main.py,
  get_event_emitter: a "status" event is appended to the message's `statusHistory` in the database; each one is a
  rewrite of the chat), so the waking lines can't be kept out of the database; but its status block is drawn only
  while the latest status is not hidden (src/lib/components/chat/Messages/ResponseMessage/StatusHistory.svelte:
  `{#if status?.hidden !== true}` on the last one; StatusItem.svelte skips hidden ones), so once the model answers the
  line is gone, live and when the chat is opened again. Refreshes are kept few for the same reason
  (`progress_interval`, 10 s by default; a new phase is shown at once).
- `reasoning`: `chat.completion.chunk`s whose `choices[0].delta.reasoning_content` is one line per update, as
  llama-swap's `sendLoadingState` does, for clients that show reasoning (Open WebUI's "Thinking" block, Cline,
  LibreChat): they parse as ordinary chunks.

The words come from the read model (`Waker.describe()`), nothing else: "Waking gpt-oss-120b: waiting for memory
behind qwen3-coder (#1 in the queue), 40 s of ~3 min". Phases: waiting for memory behind the models ahead or holding
it, with the queue position; evicting the ones being stopped for it; creating the container (docker) or launching the
engine (process) while no engine exists yet; loading the model once it runs and is not ready; waking from sleep; ready.
The estimate is the model's own history (gateway/hints.py `expected_wait`); a model that never started here has none.
"""

import json
import time
from dataclasses import dataclass

from gateway.hints import expected_wait
from waker.config.spec import Progress, RuntimeKind
from waker.state import ModelState
from waker.status import WakerStatus

S = ModelState
CHAT_PATH = "/chat/completions"  # what follows /v1: the only path progress is ever sent on


def choose(key: Progress | None, model: Progress | None) -> Progress:
    """The style for a request: its key's if set, else its model's, else off."""
    return key if key is not None else model if model is not None else Progress.OFF


def applies(path: str, stream: bool) -> bool:
    """Only streaming chat completions may carry progress."""
    return stream and path == CHAT_PATH


def keepalive(model: str, waited: float) -> bytes:
    """The SSE comment sent while a stream waits (the words tests and people grep for: `: waking <model>`)."""
    return f": waking {model} ({waited:.0f}s)\n\n".encode()


@dataclass(frozen=True, slots=True)
class Phase:
    """Where a wake stands: `key` changes exactly when the words worth showing at once change."""

    key: str
    words: str


def phase(described: WakerStatus, model: str) -> Phase:
    """The phase of `model`'s wake, in words (see the module docstring)."""
    status = described.model(model)
    state = status.state
    admission = status.admission
    if state is S.READY:
        return Phase("ready", "ready")
    if admission.outcome == "queued" and state in (S.STOPPED, S.FAILED, S.SLEEPING, S.STOPPING):
        behind = admission.waiting_for
        evicting = [name for name in behind if _state(described, name) is S.STOPPING]
        if evicting:
            names = ", ".join(evicting)
            return Phase(f"evicting {names}", f"evicting {names} to make room")
        where = f" (#{admission.position} in the queue)" if admission.position else ""
        if behind:
            names = ", ".join(behind)
            return Phase(f"queued {names}{where}", f"waiting for memory behind {names}{where}")
        return Phase(f"queued{where}", f"waiting for memory{where}")
    if state is S.STARTING:
        if status.engine is None:
            making = "creating the container" if status.spec.runtime is RuntimeKind.DOCKER else "launching the engine"
            return Phase("creating", making)
        return Phase("loading", "loading the model")
    if state in (S.WAKING, S.SLEEPING):
        return Phase("waking", "waking from sleep")
    if state is S.STOPPING:
        return Phase("stopping", "waiting for its previous engine to stop")
    return Phase("starting", "starting")


def line(described: WakerStatus, model: str, waited: float) -> tuple[Phase, str]:
    """The phase and the line shown for it: "Waking <model>: <phase>, <waited> of ~<estimate>"."""
    now = phase(described, model)
    remaining = expected_wait(described, model)
    text = f"Waking {model}: {now.words}, {human(waited)}"
    if remaining is not None and now.key != "ready":
        text += f" of ~{human(waited + remaining)}" if remaining > 0 else ", longer than usual"
    return now, text


def human(seconds: float) -> str:
    """A wait as people say it: "40 s", "3 min", "1.5 h"."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class Reporter:
    """The progress of one waiting stream: what to send, and when (a new phase at once, else every `refresh`)."""

    def __init__(self, style: Progress, model: str, served: str, refresh: float, arrived: float) -> None:
        assert style is not Progress.OFF
        self.style = style
        self.model = model  # the model's name, as the lines say it
        self.served = served  # the name its engine's chunks carry (`model` of a reasoning chunk)
        self.refresh = refresh
        self.arrived = arrived  # time.monotonic() when the request arrived
        self._shown: str | None = None  # the key of the phase last sent
        self._sent_at: float | None = None
        self._first = True

    def update(self, described: WakerStatus, now: float | None = None) -> bytes:
        """The chunk to send now (b"" when nothing is due): the line for the current phase, if it is new or the last
        one is `refresh` old."""
        now = time.monotonic() if now is None else now
        try:
            current, text = line(described, self.model, now - self.arrived)
        except KeyError:  # removed from models.d while it waits: its request is told so when the wait ends
            return b""
        if current.key == self._shown and self._sent_at is not None and now - self._sent_at < self.refresh:
            return b""
        self._shown, self._sent_at = current.key, now
        return self._chunk(text, done=False)

    def done(self, now: float | None = None) -> bytes:
        """The last chunk, sent before the engine's first byte."""
        return self._last("is ready", now)

    def failed(self, now: float | None = None) -> bytes:
        """The last chunk instead of `done`, sent before the error that ends the wait (a start that failed, the model
        removed, a full queue, the request's time up): "is ready" must not be the line just above the error."""
        return self._last("could not be woken", now)

    def _last(self, said: str, now: float | None) -> bytes:
        now = time.monotonic() if now is None else now
        if self.style is Progress.OPEN_WEBUI:
            return self._chunk(f"{self.model} {said}", done=True)
        return self._chunk(f"{self.model} {said} after {human(now - self.arrived)}.\n\n", done=True)

    def _chunk(self, text: str, done: bool) -> bytes:
        if self.style is Progress.OPEN_WEBUI:
            status: dict[str, object] = {"description": text, "done": done}
            if done:
                status["hidden"] = True  # the status block disappears once the answer begins (module docstring)
            payload: dict[str, object] = {"event": {"type": "status", "data": status}}
        else:
            delta: dict[str, str] = {"role": "assistant"} if self._first else {}
            delta["reasoning_content"] = text if done else text + "\n"
            payload = {"id": "sparkgate-waking", "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": self.served, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        self._first = False
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _state(described: WakerStatus, model: str) -> ModelState | None:
    try:
        return described.model(model).state
    except KeyError:
        return None


__all__ = ["CHAT_PATH", "Phase", "Reporter", "applies", "choose", "human", "keepalive", "line", "phase"]
