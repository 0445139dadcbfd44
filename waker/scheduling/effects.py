"""The seam between the scheduling executors and the world: what a step reads of each model, and the only
two things it ever does to one.

The waker implements `Effects` over its controllers; bench/trace.py and bench/cluster.py over simulated
engines; unit tests over a recording fake. So the executors in node.py and cluster.py are the same code in
production, in tests and in the simulations, and they never touch a controller (the shape of llama-swap's
`scheduler.Effects`).
"""

from dataclasses import dataclass
from typing import Protocol

from waker.state import Hold, ModelState


@dataclass(frozen=True, slots=True)
class Usage:
    """One model as a scheduling step sees it."""

    state: ModelState
    hold: Hold
    in_flight: int = 0  # requests being served
    waiting: int = 0  # requests waiting for it (joining its start, held back by a drain, queued for room)
    last_used: float | None = None


class Effects(Protocol):
    def usage(self, model: str) -> Usage:
        """What `model` is doing now."""
        ...

    def start(self, model: str, nodes: tuple[str, ...]) -> bool:
        """Begin starting `model` on `nodes` (head first), or waking it if it sleeps. False when it can't be
        begun now (removed from models.d, the gateway shutting down): its waiters are told to ask again."""
        ...

    def evict(self, model: str, reason: str, *, ignore_waiting: bool) -> bool:
        """Begin stopping `model` if it is still idle (nothing in flight, and nothing waiting unless
        `ignore_waiting`: requests held back by a drain don't keep it). False if it took work since the plan."""
        ...


__all__ = ["Effects", "Hold", "Usage"]
