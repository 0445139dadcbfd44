"""The memory budget of one node: what may be held there."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Budget:
    """`total_gb` of the node minus `reserve_gb` for the OS and the gateway (GiB)."""

    total_gb: float = 128.0  # a DGX Spark's unified memory
    reserve_gb: float = 8.0

    @property
    def capacity_gb(self) -> float:
        return max(self.total_gb - self.reserve_gb, 0.0)
