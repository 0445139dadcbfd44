"""The memory budget of one node: what may be held there."""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Budget:
    """`total_gb` of the node minus `reserve_gb` for the OS and the gateway (GiB)."""

    total_gb: float = 128.0  # a DGX Spark's unified memory
    reserve_gb: float = 8.0

    @property
    def capacity_gb(self) -> float:
        return max(self.total_gb - self.reserve_gb, 0.0)


class MemoryProbe(Protocol):
    """A live reading of a node's free memory, checked against the ledger before every start (implemented in
    waker/runtime/memory.py and waker/runtime/docker/memory_probe.py). None means "can't tell right now": the
    ledger alone decides."""

    name: str

    def free_gb(self) -> float | None:
        """Memory a new engine could get now, in GiB; None when it can't be read right now."""
        ...

    def total_gb(self) -> float | None:
        """Total memory in GiB; None if unknown."""
        ...
