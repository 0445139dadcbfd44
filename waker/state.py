"""Model states and the only transitions allowed between them."""

from enum import StrEnum


class ModelState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


S = ModelState
ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    S.STOPPED: frozenset({S.STARTING, S.READY}),  # READY directly: an always-on external endpoint
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED}),
}


class IllegalTransition(RuntimeError):
    def __init__(self, model: str, source: ModelState, target: ModelState) -> None:
        super().__init__(f"{model}: {source} -> {target} is not an allowed transition")
        self.model, self.source, self.target = model, source, target


def check_transition(model: str, source: ModelState, target: ModelState) -> None:
    if target not in ALLOWED[source]:
        raise IllegalTransition(model, source, target)
