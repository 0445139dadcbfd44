"""The adapter protocol every engine implements, and the facts it is made of."""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from waker.config.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class Readiness:
    """How to tell the engine is ready: GET `path` answers 200.

    `expect_model`: the answer must also list the served model name (OpenAI `/v1/models` shape);
    used for servers that answer before the model is loaded or have no health route.
    """

    path: str
    expect_model: bool = False


@dataclass(frozen=True, slots=True)
class Launch:
    """Where the engine listens, as the adapter is asked to configure it."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request to the engine's own API: `method` on `path` (relative to its root URL, query
    included), with `json` as the body when set. Sleep and wake are sequences of these."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    expect: str | None = None
    """A key the JSON answer must hold, non-empty (a generation's `choices`); None: any 2xx answer will do. An
    answer `{"success": false, ...}` (SGLang's weight updates) is a failure either way."""
    retry: bool = False
    """Made again while it is refused, until the sequence's deadline: a precondition the engine reaches on its own
    soon (SGLang's `/flush_cache` answers 400 until the last request has left its scheduler)."""


@dataclass(frozen=True, slots=True)
class EngineRoute:
    """One of the engine's own routes that the gateway forwards, as `/engines/{model}{path}` (gateway/engine_routes.py).

    An allow-list: only the routes an adapter declares are forwarded, each with the methods it declares, and the engine
    is always called on the declared path itself, never on what the client wrote. Routes that change the engine for
    everyone (sleep, wake, RPC, weights, caches, settings, profiling), generate outside `/v1`, or take data that others
    collect (routes whose every read drains a queue) are never declared; each adapter says what it left out and why.
    """

    methods: frozenset[str]
    uses_model: bool
    """True: the route asks the model something (tokenize): it is leased like a request, so a stopped model is started
    and a sleeping one woken, and it counts as use. False: it reads the running engine's state (props, version, load):
    answered only while the model is ready, and it never starts, wakes or keeps awake a model that nobody uses."""
    redact: frozenset[str] = frozenset()
    """Top-level keys dropped from its JSON answer: secrets the engine echoes (SGLang's server_args hold api_key)."""

    @classmethod
    def using_model(cls, *methods: str) -> "EngineRoute":
        return cls(frozenset(methods), uses_model=True)

    @classmethod
    def reading_state(cls, *methods: str, redact: tuple[str, ...] = ()) -> "EngineRoute":
        return cls(frozenset(methods), uses_model=False, redact=frozenset(redact))


NO_ROUTES: Mapping[str, EngineRoute] = MappingProxyType({})
"""The routes of an engine whose API we don't know (generic): none."""


def generation_check(spec: ModelSpec) -> Call:
    """A one-token completion: the proof that a woken engine generates again (upstream has wakes that answer 200
    and leave the engine broken: vLLM #50011, #49237). Any engine that serves `/v1/completions` answers it; an
    embedding model (vLLM `--runner pooling`, `--task embed`, `--convert embed`; SGLang `--is-embedding`) has no
    completions route, so it is asked for one embedding instead."""
    headers = (("Authorization", f"Bearer {spec.api_key}"),) if spec.api_key else ()
    if serves_embeddings(spec.args):
        return Call("POST", "/v1/embeddings", {"model": spec.upstream_name, "input": "Hello"}, headers, expect="data")
    body = {"model": spec.upstream_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    return Call("POST", "/v1/completions", body, headers, expect="choices")


_POOLING_VALUES = {"--runner": {"pooling"}, "--task": {"embed", "embedding", "classify", "score", "reward"},
                   "--convert": {"embed", "classify", "reward"}}


def serves_embeddings(args: tuple[str, ...]) -> bool:
    """Whether an engine launched with `args` is a pooling (embedding) model rather than a generator."""
    for i, arg in enumerate(args):
        if arg == "--is-embedding":
            return True
        flag, _, value = arg.partition("=")
        if not value and i + 1 < len(args):
            value = args[i + 1]
        if value in _POOLING_VALUES.get(flag, ()):
            return True
    return False


class Engine(Protocol):
    """An engine adapter. Pure: builds argv, readiness and the engine's API calls from the spec, does no I/O.

    Everything the waker needs to know about one engine lives in its adapter: the command line, how to
    tell it is ready, the spec as launched (with the flags its sleep mode needs), how to put it to sleep
    and wake it, how to ask whether it sleeps, where its Prometheus metrics are, and which of its own routes
    clients may reach through the gateway.
    """

    kind: str
    supports_sleep: bool
    """The engine can free its memory while staying up (ModelSpec allows idle_action sleep only then)."""
    metrics_path: str | None
    """Its Prometheus route, relative to the root URL; None when it has none."""
    routes: Mapping[str, EngineRoute]
    """Its own routes the gateway forwards (`/engines/{model}{path}`), by path relative to the root URL: an allow-list
    (see EngineRoute); empty when we don't know the engine's API."""

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        """The full command line (executable first) that serves `spec` on launch.host:launch.port."""
        ...

    def readiness(self, spec: ModelSpec) -> Readiness:
        """The readiness check; spec.health_path overrides the path."""
        ...

    def launch_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec as launched: `spec` plus the flags and environment its sleep mode needs, if any.

        Used both for launching and for the spec hash, so an adopted engine is compared like for like.
        """
        ...

    def launch_hash(self, spec: ModelSpec) -> str:
        """`launch_spec(spec).spec_hash()`: the hash a running engine of `spec` is labelled with."""
        ...

    def sleep_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        """The calls, in order, that put a running engine of `spec` to sleep; ValueError without sleep mode."""
        ...

    def wake_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        """The calls, in order, that wake a sleeping engine of `spec`; ValueError without sleep mode."""
        ...

    def sleep_state_call(self, spec: ModelSpec) -> Call | None:
        """The call that asks whether the engine sleeps (answering `{"is_sleeping": bool}`), or None when
        the engine can't tell."""
        ...


class NoSleepMode:
    """The sleep facts of an engine without a sleep mode: launched as written, never put to sleep.

    Mixed into the adapters of such engines so each states `supports_sleep = False` once instead of
    repeating five trivial methods.
    """

    kind: str
    supports_sleep: bool = False

    def launch_spec(self, spec: ModelSpec) -> ModelSpec:
        return spec

    def launch_hash(self, spec: ModelSpec) -> str:
        return self.launch_spec(spec).spec_hash()

    def sleep_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        raise ValueError(f"engine {self.kind} has no sleep mode")

    def wake_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        raise ValueError(f"engine {self.kind} has no sleep mode")

    def sleep_state_call(self, spec: ModelSpec) -> Call | None:
        return None
