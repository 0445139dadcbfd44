"""The memory budget of one node: what may be held, and what the config may ask of it."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from waker.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class Budget:
    """`total_gb` of the node minus `reserve_gb` for the OS and the gateway (GiB)."""

    total_gb: float = 128.0  # a DGX Spark's unified memory
    reserve_gb: float = 8.0

    @property
    def capacity_gb(self) -> float:
        return max(self.total_gb - self.reserve_gb, 0.0)


def budget_problems(specs: Iterable[ModelSpec], budgets: Mapping[str, Budget]) -> list[str]:
    """Models that could never run on their node (too big, or an unknown node), as config errors."""
    problems = []
    for spec in specs:
        if not spec.manages_lifecycle:
            continue
        budget = budgets.get(spec.node)
        where = str(spec.source) if spec.source else spec.name
        if budget is None:
            problems.append(f"{where}: node: unknown node {spec.node!r} (configured: {', '.join(budgets)})")
        elif spec.memory_gb > budget.capacity_gb:
            problems.append(
                f"{where}: memory_gb: {spec.name} needs {spec.memory_gb:g} GB but node {spec.node!r} has a budget of "
                f"{budget.capacity_gb:g} GB ({budget.total_gb:g} total - {budget.reserve_gb:g} reserve)"
            )
    return problems
