"""Model states, the only transitions allowed between them, and what a model holds in each."""

from enum import Enum, StrEnum


class ModelState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    SLEEPING = "sleeping"  # engine up, weights/KV cache released (vLLM sleep mode, SGLang memory release)
    WAKING = "waking"  # taking its memory back; like STARTING, with its own timeout


class Hold(Enum):
    """How much of its footprint a model's engine holds in its nodes' ledgers right now."""

    NONE = "none"  # no engine (or one known to be gone)
    SLEEPING = "sleeping"  # asleep: its sleeping footprint
    FULL = "full"  # starting, ready, waking, stopping, falling asleep, or an engine that may still run


S = ModelState
ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    S.STOPPED: frozenset({S.STARTING, S.READY, S.SLEEPING}),  # READY: an external endpoint; SLEEPING: adopted asleep
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.STOPPING, S.FAILED, S.SLEEPING}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.FAILED}),
    S.WAKING: frozenset({S.READY, S.FAILED, S.STOPPING, S.STARTING}),  # STARTING: a failed wake starts it cold
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED, S.SLEEPING}),  # SLEEPING: an engine found asleep
}

# States an operation passes through: a model is never in one without a live operation task that ends it
# within its timeout (waker/lifecycle/controller.py; checked after every step of tests/sim).
TRANSITIONAL = frozenset({S.STARTING, S.WAKING, S.STOPPING})

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
