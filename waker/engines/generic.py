"""Generic adapter: any OpenAI-compatible server, launched exactly as the user wrote it.

We know none of its flags, so instead of adding any we substitute placeholders in every element of
`spec.command + spec.args`: `{host}`, `{port}`, `{model}`, `{served_name}`, `{name}`. Substitution is
plain `str.replace` per placeholder, not `str.format`, so arguments holding JSON or other braces
(`--config '{"a": 1}'`) pass through untouched.

Readiness is `GET /v1/models` answering 200: the one route every OpenAI-compatible server has. It is
only a liveness signal (some servers list models before they finish loading), which is why the list is
not required to contain the served name: servers differ in what they list. Set `health_path` when the
server has a better route.

Metrics: `/metrics`, the usual Prometheus route; tried only for engines the waker runs (a generic external
endpoint may be a hosted API that is not ours to poll). No sleep mode: we don't know its API.

Engine routes: none (`NO_ROUTES`). We don't know which of its routes are harmless, and an allow-list can't hold what
we don't know; `/engines/{model}/...` answers 404 for a generic model.
"""

from collections.abc import Mapping

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import NO_ROUTES, EngineRoute, Launch, NoSleepMode, Readiness


class GenericEngine(NoSleepMode):
    """Runs `spec.command + spec.args` with placeholders filled in; adds nothing of its own."""

    kind: str = EngineKind.GENERIC.value
    metrics_path: str | None = "/metrics"
    routes: Mapping[str, EngineRoute] = NO_ROUTES

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        if not spec.command:
            raise ValueError(f"model {spec.name!r}: engine generic needs `command` (the program to run)")
        values = {
            "{host}": launch.host,
            "{port}": str(launch.port),
            "{served_name}": spec.upstream_name,
            "{name}": spec.name,
        }
        argv: list[str] = []
        for arg in (*spec.command, *spec.args):
            if "{model}" in arg:
                if not spec.model:
                    raise ValueError(f"model {spec.name!r}: an argument uses {{model}} but `model` is unset")
                arg = arg.replace("{model}", spec.model)
            for placeholder, value in values.items():
                arg = arg.replace(placeholder, value)
            argv.append(arg)
        return argv

    def readiness(self, spec: ModelSpec) -> Readiness:
        return Readiness(path=spec.health_path or "/v1/models", expect_model=False)
