"""The read model: what the gateway (admin API, /v1/models, metrics, status page, CLI) and the stats sampler
see of the waker. `Waker.describe()` builds one consistent `WakerStatus` in a single synchronous step; readers
format it and never reach into controllers, seats or node queues."""

from collections.abc import Mapping
from dataclasses import dataclass, field

from waker.config.spec import ModelSpec
from waker.runtime.base import EngineHandle
from waker.state import ModelState


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a model is FAILED: the reason, the engine's exit code and last lines, and when (wall time)."""

    reason: str
    exit_code: int | None
    log_tail: tuple[str, ...]
    at: float


@dataclass(frozen=True, slots=True)
class Admission:
    """A model's latest admission: the scheduling side's answer to a request's (or a warm's) ask for room, as its
    owner (`scheduling.seat.Admission`, written by the cluster admission) holds it; `Waker.describe()` copies it.

    `outcome`: "queued" (waits for memory on `node`, at `position` in its queue, behind `waiting_for`), "admitted"
    (its start or wake began), "refused" (no room: `reason` is the message its requests got) or "withdrawn"
    (nobody waits any more: the requests left, or models.d moved or removed it); None: not asked since the
    gateway started. `attempt` counts the asks (requests joining one queued ask share it), so a reader who asked
    can tell its own outcome from an older one (`sparkgate warm` does)."""

    outcome: str | None = None
    reason: str | None = None  # why it waits, or was refused (the words of the error its requests got)
    since: float | None = None  # when the outcome began (waker clock)
    attempt: int = 0
    node: str | None = None  # queued: the node whose queue holds it; else where it was admitted or refused
    position: int | None = None  # queued: 1 is the head of that node's queue
    waiting_for: tuple[str, ...] = ()  # queued: the models queued ahead of it there, then those holding the memory


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model at one moment. Times are the waker clock's monotonic seconds, except `Failure.at`."""

    name: str
    spec: ModelSpec
    state: ModelState
    since: float  # when it entered `state`
    in_flight: int = 0  # requests being served
    waiting: int = 0  # requests waiting for it to be ready (joining a start, held back, queued)
    queued: int = 0  # of those, the ones queued for room in a node's budget
    last_used: float | None = None
    ready_since: float | None = None
    failures: int = 0  # consecutive failed starts (the backoff counts these)
    retry_at: float | None = None  # no new start before this (backoff)
    last_error: Failure | None = None
    pinned: bool = False
    nodes: tuple[str, ...] = ()  # where it may run, in settings order (empty: not managed by the waker)
    placed: tuple[str, ...] = ()  # where it runs or was placed to start, head first
    held_on: Mapping[str, float] = field(default_factory=dict)  # GB held in each node's ledger (nonzero only)
    engine: EngineHandle | None = None  # the engine it runs now, if any
    pending_reload: bool = False  # models.d changed its engine: recreated once it is idle
    removed: bool = False  # gone from models.d: stopped once idle, then forgotten
    starts: int = 0  # starts and wakes begun since the gateway started (the attempt a failure belongs to)
    admission: Admission = field(default_factory=Admission)  # its latest ask for room (scheduling's answer)
    # The median of its latest successful starts and wakes, seconds (None: none yet): what a waiting request is told
    # to expect (ModelController.typical_start_s, typical_wake_s).
    typical_start_s: float | None = None
    typical_wake_s: float | None = None

    @property
    def managed(self) -> bool:
        return self.spec.manages_lifecycle

    @property
    def held_gb(self) -> float:
        return sum(self.held_on.values())

    @property
    def node(self) -> str | None:
        """Where it runs (the head node for a model spanning several), or None."""
        return self.placed[0] if self.placed else None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node's budget and queue."""

    name: str
    capacity_gb: float  # total_gb - reserve_gb
    total_gb: float
    reserve_gb: float
    held_gb: float  # what its ledger holds now
    queued: int  # requests waiting for room here
    live_free_gb: float | None  # what its memory probe reads now (None: can't tell)
    probe: str  # the probe's name
    high_water_gb: float  # the most its ledger ever held
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WakerStatus:
    """Every model and node, read at `now` (the waker clock)."""

    now: float
    models: tuple[ModelStatus, ...]
    nodes: tuple[NodeStatus, ...]
    routes: Mapping[str, str]  # every model name and alias -> the model's name

    def model(self, name: str) -> ModelStatus:
        """The status of `name` (a model name or alias); KeyError if there is none."""
        target = self.routes.get(name, name)
        for status in self.models:
            if status.name == target:
                return status
        raise KeyError(name)


__all__ = ["Admission", "Failure", "ModelStatus", "NodeStatus", "WakerStatus"]
