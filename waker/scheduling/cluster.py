"""Admission across nodes: place a cold model (`placement.choose`), then queue it on its node(s).

Each node keeps its own ledger, queue and scheduler (`admission.NodeAdmission`); this only decides
where. A model that spans several nodes is admitted by each of them in turn, always in settings
order: a node that admits it holds its share (reserved) while the next one makes room, and two such
models can never hold one node each while waiting for the other's (ordered acquisition).
"""

from collections.abc import Mapping

from waker.clock import Clock
from waker.errors import NoRoom
from waker.events import Event, EventLog
from waker.lifecycle.controller import ModelController
from waker.scheduling.node import NodeAdmission
from waker.scheduling.placement import choose
from waker.state import ModelState

S = ModelState


class ClusterAdmission:
    """The `Admission` of a model that may run on several nodes, or spans several."""

    def __init__(self, nodes: Mapping[str, NodeAdmission], clock: Clock, events: EventLog) -> None:
        self._nodes = nodes  # filled when the waker starts; settings order
        self._clock = clock
        self._events = events
        self._admitting: dict[str, int] = {}  # model -> callers inside admit()

    async def admit(self, controller: ModelController) -> None:
        name = controller.spec.name
        self._admitting[name] = self._admitting.get(name, 0) + 1
        try:
            nodes = controller.placed or self._place(controller)
            order = list(self._nodes)
            for node in sorted(nodes, key=order.index):
                if controller.state not in (S.STOPPED, S.FAILED, S.SLEEPING):
                    return  # started meanwhile (the last node admitted it for another caller)
                if node not in controller.reserved:
                    await self._nodes[node].admit(controller)
        finally:
            self._admitting[name] -= 1
            if not self._admitting[name]:
                del self._admitting[name]
                if controller.state in (S.STOPPED, S.FAILED) and (controller.reserved or controller.placed):
                    # Nobody waits any more and it never started: give back what was reserved for it.
                    controller.unplace()
                    self.kick_nodes(controller.candidates)

    def _place(self, controller: ModelController) -> tuple[str, ...]:
        spec = controller.spec
        snapshots = {n: self._nodes[n].snapshot() for n in controller.candidates}
        exclusive = {n: self._nodes[n].exclusive_gb(excluding=spec.name) for n in controller.candidates}
        nodes = choose(spec.name, spec.memory_gb, spec.nodes, controller.candidates, snapshots, exclusive)
        if nodes is None:
            raise NoRoom(
                f"{spec.name} needs {spec.memory_gb:g} GB on {spec.nodes} node(s) of {', '.join(controller.candidates)}"
                "; pinned models hold too much of them", model=spec.name)
        controller.place(nodes)
        if len(controller.candidates) > spec.nodes:
            self._events.emit(Event(self._clock.wall(), spec.name, "placed", reason=f"on {', '.join(nodes)}", data={
                "nodes": list(nodes), "candidates": list(controller.candidates)}))
        return nodes

    def kick(self) -> None:
        for admission in self._nodes.values():
            admission.kick()

    def kick_nodes(self, nodes: tuple[str, ...]) -> None:
        for node in nodes:
            self._nodes[node].kick()
