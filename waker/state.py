"""Model states and the only transitions allowed between them."""

from enum import StrEnum


class ModelState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    SLEEPING = "sleeping"  # engine up, weights/KV cache released (vLLM sleep mode, SGLang memory release)
    WAKING = "waking"  # taking its memory back; like STARTING, with its own timeout


S = ModelState
ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    S.STOPPED: frozenset({S.STARTING, S.READY}),  # READY directly: an always-on external endpoint
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.STOPPING, S.FAILED, S.SLEEPING}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.FAILED}),
    S.WAKING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED}),
}

# States in which a model holds memory in its node's budget (SLEEPING by its sleeping footprint;
# STOPPING until the engine is gone).
HOLDING = frozenset({S.STARTING, S.READY, S.SLEEPING, S.WAKING, S.STOPPING})


class IllegalTransition(RuntimeError):
    def __init__(self, model: str, source: ModelState, target: ModelState) -> None:
        super().__init__(f"{model}: {source} -> {target} is not an allowed transition")
        self.model, self.source, self.target = model, source, target


def check_transition(model: str, source: ModelState, target: ModelState) -> None:
    if target not in ALLOWED[source]:
        raise IllegalTransition(model, source, target)
