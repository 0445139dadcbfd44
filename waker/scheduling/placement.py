"""Placement: which node(s) a cold model starts on. Pure functions, no I/O.

A model may run on the nodes its entry names (`node`, `node_labels`; default: any node whose budget
can hold it). When it is cold, each candidate node is scored from that node's own snapshot (the
same one `scheduler.plan` sees) and the best one is taken:

1. a node where it fits now, after the requests already queued there, beats one where something must
   be stopped; among those, one where it leaves room for the models that may run nowhere else (stopped
   now, they will come back), then the tightest fit (best fit: small models fill partly used nodes and
   leave whole nodes free for big ones);
2. else a node where idle models can be stopped for it: fewest victims, then least valuable victims
   (lowest priority, then least recently used: the same order the scheduler evicts in), then the fewest GB
   thrown away;
3. else a node where busy models would have to drain for it, scored the same way;
4. else a node where it only has to wait for engines that are starting;
and a node where it can never fit (pinned models hold the rest) is not a candidate at all.
Ties go to the node listed first in the settings, so placement is deterministic.
bench/cluster.py measures the rules on a 12-node trace against first-fit and static placement.

A model that spans `nodes: N` takes the best N distinct candidates. A sleeping model is woken where it
sleeps. Once placed, the node's own scheduler (`scheduler.plan`) admits it, with the same FIFO,
no-starvation and never-over-budget rules as on a single node.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from waker.config.spec import ModelSpec, RuntimeKind
from waker.scheduling.budget import Budget
from waker.scheduling.plan import ModelView, Snapshot, choose_victims
from waker.state import ModelState

S = ModelState

FITS, EVICT_IDLE, DRAIN_BUSY, WAIT = range(4)


@dataclass(frozen=True, slots=True, order=True)
class Score:
    """Lower is better; compared field by field."""

    tier: int  # FITS, EVICT_IDLE, DRAIN_BUSY or WAIT
    crowds: int  # 1: fitting here takes room that models which may run only here will need
    victims: int  # how many models must stop
    priority: int  # the highest priority among them
    recency: float  # the most recent use among them (stopping a model used a second ago is costly)
    evicted_gb: float  # memory thrown away
    room_gb: float  # the free room left after the start (best fit: less is better)
    order: int  # position of the node in the settings


def candidates(spec: ModelSpec, budgets: Mapping[str, Budget],
               labels: Mapping[str, Mapping[str, str]] | None = None) -> tuple[str, ...]:
    """The nodes `spec` may run on, in settings order: named ones (or all), carrying its labels, big
    enough. Processes run where the gateway runs: on the node named, else on `local` (or the first)."""
    labels = labels or {}
    named = spec.candidate_nodes
    if spec.runtime is RuntimeKind.PROCESS and named is None:
        pool = ["local"] if "local" in budgets else list(budgets)[:1]
    else:
        pool = [n for n in budgets if named is None or n in named]
    wanted = spec.node_labels.items()
    return tuple(
        n for n in pool
        if all(labels.get(n, {}).get(k) == v for k, v in wanted) and spec.memory_gb <= budgets[n].capacity_gb
    )


def placement_problems(spec: ModelSpec, budgets: Mapping[str, Budget],
                       labels: Mapping[str, Mapping[str, str]] | None = None) -> list[str]:
    """Why `spec` could never be placed (as config errors), or nothing."""
    where = str(spec.source) if spec.source else spec.name
    unknown = [n for n in spec.candidate_nodes or () if n not in budgets]
    if unknown:
        return [f"{where}: node: unknown node {n!r} (configured: {', '.join(budgets)})" for n in unknown]
    found = candidates(spec, budgets, labels)
    if len(found) >= spec.nodes:
        return []
    # Too few: say which rule left them out, with the numbers.
    roomy = candidates(spec.model_copy(update={"memory_gb": 0.0}), budgets, labels)
    small = [n for n in roomy if n not in found]
    problems = [
        f"{where}: memory_gb: {spec.name} needs {spec.memory_gb:g} GB but node {n!r} has a budget of "
        f"{budgets[n].capacity_gb:g} GB ({budgets[n].total_gb:g} total - {budgets[n].reserve_gb:g} reserve)"
        for n in small
    ]
    if spec.nodes > 1 or not small:
        asked = [f"node {list(spec.candidate_nodes)}"] if spec.candidate_nodes is not None else []
        if spec.node_labels:
            asked.append(f"labels {dict(spec.node_labels)}")
        asked.append(f"a budget of at least {spec.memory_gb:g} GB")
        need = f"{spec.nodes} nodes" if spec.nodes > 1 else "a node"
        problems.append(f"{where}: {spec.name} needs {need} with {', '.join(asked)}; "
                        f"found {len(found)} ({', '.join(found) or 'none'})")
    return problems


def budget_problems(specs: Iterable[ModelSpec], budgets: Mapping[str, Budget],
                    labels: Mapping[str, Mapping[str, str]] | None = None) -> list[str]:
    """Models that could never run (unknown node, too big for every node they may use), as config errors."""
    return [p for spec in specs if spec.manages_lifecycle for p in placement_problems(spec, budgets, labels)]


def score(snap: Snapshot, model: str, need_gb: float, order: int, exclusive_gb: float = 0.0) -> Score | None:
    """How good `snap`'s node is for starting `model` (needing `need_gb`); None if it never fits there.
    `exclusive_gb`: memory of stopped models that may run only on this node."""
    others = [m for m in snap.models.values() if m.name != model]
    pinned = sum(m.held_gb for m in others if m.pinned)
    if need_gb > snap.capacity_gb - pinned:
        return None
    free = snap.capacity_gb - snap.held_gb - sum(t.need_gb for t in snap.queue if t.model != model)
    if snap.live_free_gb is not None:
        starting = sum(m.held_gb for m in snap.models.values() if m.state in (S.STARTING, S.WAKING))
        free = min(free, snap.live_free_gb - starting)
    if need_gb <= free:
        return Score(FITS, int(need_gb > free - exclusive_gb), 0, 0, 0.0, 0.0, free - need_gb, order)
    shortfall = need_gb - free
    idle = [m for m in others if m.evictable and m.idle]
    busy = [m for m in others if m.evictable and not m.idle]
    for tier, pool in ((EVICT_IDLE, idle), (DRAIN_BUSY, idle + busy)):
        victims = choose_victims(pool, shortfall)
        if victims is not None:
            return _victims_score(tier, victims, order)
    return Score(WAIT, 0, 0, 0, 0.0, 0.0, shortfall, order)


def _victims_score(tier: int, victims: Sequence[ModelView], order: int) -> Score:
    return Score(
        tier, 0, len(victims), max((v.priority for v in victims), default=0),
        max((v.last_used for v in victims), default=0.0), sum(v.held_gb for v in victims), 0.0, order,
    )


def choose(model: str, need_gb: float, count: int, nodes: Sequence[str], snapshots: Mapping[str, Snapshot],
           exclusive_gb: Mapping[str, float] | None = None) -> tuple[str, ...] | None:
    """The `count` best nodes among `nodes` (in settings order) for `model`, best first; None if fewer
    than `count` could ever hold it. `exclusive_gb`: per node, memory of stopped models that may run only there."""
    exclusive_gb = exclusive_gb or {}
    scored = [(s, n) for i, n in enumerate(nodes)
              if (s := score(snapshots[n], model, need_gb, i, exclusive_gb.get(n, 0.0))) is not None]
    if len(scored) < count:
        return None
    return tuple(n for _, n in sorted(scored)[:count])
