"""The adapter protocol every engine implements."""

from dataclasses import dataclass
from typing import Protocol

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


class Engine(Protocol):
    """An engine adapter. Pure: builds argv and readiness from the spec, does no I/O."""

    kind: str

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        """The full command line (executable first) that serves `spec` on launch.host:launch.port."""
        ...

    def readiness(self, spec: ModelSpec) -> Readiness:
        """The readiness check; spec.health_path overrides the path."""
        ...
