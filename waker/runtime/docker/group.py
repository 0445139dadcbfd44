"""A model that spans several nodes: one container per node, started in order, watched and stopped as one.

The parts come from waker.engines.multinode (vLLM: Ray head, Ray workers, then `vllm serve` run in the head
container by `docker exec`; SGLang: one launch_server per rank). Each part starts on its own node's Docker
host only once the one before it is up, within `multinode.join_timeout`; a part that fails or never comes up
takes the parts already started down with it (no half-started group is left behind).

The group ends when ANY part ends: a Ray worker gone means vLLM can't serve either, and waiting for the
engine to notice would leave requests hanging. Stopping goes the other way round: the serving process
first, then the workers, the head last.

Every part runs on the host network, so the port the parts meet on (Ray's GCS, SGLang's --dist-init-addr) is
picked per start on the head node (`Rendezvous`): two groups whose heads share a node never ask for the same one.
A restarted gateway judges the parts it finds by the rule of `discover_groups`.
"""

import asyncio
import contextlib
import itertools
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from waker.config.spec import ModelSpec
from waker.engines.base import Engine
from waker.engines.multinode import HEAD, GroupPlan, Part, plan_group, rendezvous_base, role_at
from waker.runtime.base import Exit, Found, RuntimeUnavailable, free_port, http_url, run_to_end
from waker.runtime.docker.container import (
    LABEL_GROUP_NODES,
    LABEL_GROUP_SIZE,
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_MODEL,
    LABEL_NODE,
    LABEL_PART,
    LABEL_PORT,
    LABEL_RENDEZVOUS,
    DockerHandle,
    container_name,
    remove_container,
    resources,
)
from waker.runtime.docker.host import DockerHost, DockerNode

log = logging.getLogger("sparkgate.docker")

SERVE_ROLE = "serve"
# `vllm serve` runs in the head container through this wrapper: it records its pid (docker has no API to
# signal an exec'd process; stop() signals it through another exec) and sends its output to the
# container's own stdout, so `docker logs` and log_tail show it beside Ray's.
_PIDFILE = "/tmp/sparkgate-serve.pid"
_SERVE_WRAPPER = ("sh", "-c", f'echo $$ > {_PIDFILE}; exec "$@" >/proc/1/fd/1 2>/proc/1/fd/2', "sparkgate-serve")
_POLL = 0.2

# A group's rendezvous port and the ones after it are its own on its head node: SGLang uses dist_port to
# dist_port + 6 there (its ZMQ ports follow the rendezvous port). Starts take the first free block of ports from
# the configured port up, trying RENDEZVOUS_BLOCKS blocks; a head that finds its port taken all the same (a remote
# node, where no bind test can be made) is started again on the next block, up to RENDEZVOUS_ATTEMPTS times.
RENDEZVOUS_BLOCK = 10
RENDEZVOUS_BLOCKS = 32
RENDEZVOUS_ATTEMPTS = 3
_PORT_TAKEN = re.compile(r"address already in use|EADDRINUSE|is already running at", re.IGNORECASE)


def part_container_name(model: str, role: str, instance: str = "default") -> str:
    return f"{container_name(model, instance)}-{role}"


def part_config(spec: ModelSpec, part: Part, port: int, spec_hash: str, size: int, instance: str,
                rendezvous: int | None = None, nodes: Sequence[str] = ()) -> dict[str, Any]:
    """The SDK's `containers.create` arguments for one part (pure): host network, our labels (with the group's
    `nodes`, head first, and its `rendezvous` port, for the next gateway and for the next start's port pick)."""
    labels = {LABEL_MANAGED: "true", LABEL_MODEL: spec.name, LABEL_HASH: spec_hash, LABEL_PORT: str(port),
              LABEL_NODE: part.node, LABEL_INSTANCE: instance, LABEL_PART: part.role, LABEL_GROUP_SIZE: str(size)}
    if nodes:
        labels[LABEL_GROUP_NODES] = ",".join(nodes)
    if rendezvous is not None:
        labels[LABEL_RENDEZVOUS] = str(rendezvous)
    return {
        "entrypoint": list(part.argv[:1]),
        "command": list(part.argv[1:]),
        "environment": dict(part.env),
        "labels": labels,
        "network_mode": "host",
        **resources(spec),
    }


@dataclass(slots=True)
class Member:
    """A started part: its node's Docker host and its container."""

    part: Part
    node: DockerHost
    handle: DockerHandle

    @property
    def label(self) -> str:
        return f"{self.part.role}@{self.part.node}"


class PartFailed(RuntimeError):
    """A part did not come up. `port_taken`: it said its port was in use (the head's rendezvous port)."""

    def __init__(self, message: str, port_taken: bool = False) -> None:
        super().__init__(message)
        self.port_taken = port_taken


class ServeProcess:
    """`vllm serve` exec'd in the head container: polled for its end, stopped by signalling its pid."""

    def __init__(self, member: Member, exec_id: str) -> None:
        self.member = member
        self.exec_id = exec_id

    def describe(self) -> str:
        return f"vllm serve in {self.member.part.describe()}"

    async def state(self) -> tuple[bool, int | None]:
        """(running, exit code)."""
        def inspect(client: docker.DockerClient) -> tuple[bool, int | None]:
            try:
                info = client.api.exec_inspect(self.exec_id)
            except docker.errors.NotFound:  # its container is gone
                return False, None
            return bool(info.get("Running")), info.get("ExitCode")

        return await self.member.node.call(inspect)

    async def wait_exit(self) -> Exit:
        pause = 0.5
        while True:
            try:
                running, code = await self.state()
                pause = 0.5
            except RuntimeUnavailable:  # daemon blip: keep watching, as DockerHandle does
                running, code, pause = True, None, min(pause * 2, 10.0)
            if not running:
                return Exit(code if code is not None else -1, part=self.describe())
            await asyncio.sleep(pause)

    async def stop(self, grace: float) -> int | None:
        await self._signal("TERM")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            running, code = await self.state()
            if not running:
                return code
            await asyncio.sleep(_POLL)
        await self._signal("KILL")
        for _ in range(25):
            running, code = await self.state()
            if not running:
                return code
            await asyncio.sleep(_POLL)
        return None

    async def _signal(self, signal: str) -> None:
        container_id = self.member.handle.container_id

        def kill(client: docker.DockerClient) -> None:
            try:
                made = client.api.exec_create(container_id, ["sh", "-c", f'kill -{signal} "$(cat {_PIDFILE})"'])
                client.api.exec_start(made["Id"])
            except (docker.errors.NotFound, docker.errors.APIError):  # its container is gone or stopped
                pass

        await self.member.node.call(kill)


class GroupHandle:
    """An engine made of several containers on several nodes (the EngineHandle protocol).

    `serve_unknown`: a vLLM group adopted while its head's node could not be listed: its serve process is looked
    for once that node answers (none running then ends the group)."""

    def __init__(self, members: Sequence[Member], serve: ServeProcess | None, root_url: str,
                 serve_unknown: bool = False) -> None:
        self.members = tuple(members)
        self.serve = serve
        self._serve_unknown = serve_unknown and serve is None
        self._url = root_url
        self._exit: Exit | None = None
        self._ended: asyncio.Future[Exit] | None = None

    @property
    def ident(self) -> str:
        """Its parts by name: the same group reads the same whether a part was listed or only known by its name
        (its node did not answer), so the waker never takes its own engine for another one."""
        return "containers " + ", ".join(f"{m.label}:{m.handle.name}" for m in self.members)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Where it runs, head first (as spec.placed_on)."""
        return tuple(m.part.node for m in self.members)

    @property
    def root_url(self) -> str:
        return self._url

    @property
    def api_base(self) -> str:
        return self._url + "/v1"

    @property
    def exit_code(self) -> int | None:
        return self._exit.code if self._exit else None

    async def wait_exit(self) -> Exit:
        """The first part to end (a container exiting, or the vLLM serve process), named in Exit.part."""
        if self._ended is None:
            self._ended = asyncio.ensure_future(self._first_end())
        return await asyncio.shield(self._ended)

    async def _first_end(self) -> Exit:
        watches: dict[asyncio.Task[Exit], str] = {
            asyncio.ensure_future(m.handle.wait_exit()): m.part.describe() for m in self.members}
        if self.serve is not None:
            watches[asyncio.ensure_future(self.serve.wait_exit())] = self.serve.describe()
        elif self._serve_unknown:
            head = self.members[0].part.describe()
            watches[asyncio.ensure_future(self._serve_once_found())] = f"vllm serve in {head}"
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watches:
                task.cancel()
        first = next(task for task in watches if task in done)
        if len(done) > 1:
            # Several seen at once (a killed worker taking the head along): the one that ended first is the
            # cause; the serve process (no end time) comes last.
            ends = await asyncio.gather(*(self._finished_at(watches[task]) for task in done))
            first = min(zip(ends, (list(watches).index(t) for t in done), done, strict=True))[2]
        end = first.result()
        self._exit = Exit(end.code, end.oom_killed, end.part or watches[first])
        return self._exit

    async def _serve_once_found(self) -> Exit:
        """vLLM's serve process in a head whose node could not be listed: looked for once the node answers, then
        watched like any other part."""
        head, pause = self.members[0], 0.5
        while True:
            try:
                serve = await _find_serve(head)
                break
            except RuntimeUnavailable:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
        if serve is None:
            return Exit(-1, part=f"vllm serve in {head.part.describe()} (not running once its node answered)")
        self.serve, self._serve_unknown = serve, False
        return await serve.wait_exit()

    async def _finished_at(self, part: str) -> str:
        member = next((m for m in self.members if m.part.describe() == part), None)
        if member is None:
            return "~"  # after any RFC 3339 time
        container_id = member.handle.container_id

        def finished(client: docker.DockerClient) -> str:
            try:
                return _sortable(str(client.api.inspect_container(container_id)["State"].get("FinishedAt", "~")))
            except docker.errors.NotFound:
                return "~"

        try:
            return await member.node.call(finished)
        except RuntimeUnavailable:
            return "~"

    async def stop(self, grace: float) -> int | None:
        """Stop and remove every part: the serving process first, then the workers, the head last.
        Returns the serving process's exit code (vLLM serve; SGLang rank 0).

        Cancel-safe: cancelled half-way (whoever stops it gave up waiting), it still stops and removes every part,
        at once, before the cancellation propagates (tests/docker/test_docker_cancel.py)."""
        try:
            return await self._stop_in_order(grace)
        except asyncio.CancelledError:
            await run_to_end(_remove_all(self.members))
            raise

    async def _stop_in_order(self, grace: float) -> int | None:
        errors: list[BaseException] = []
        code: int | None = None
        if self.serve is not None:
            try:
                code = await self.serve.stop(grace)
            except RuntimeUnavailable as exc:
                errors.append(exc)
        workers = [m for m in self.members if m.part.role != HEAD]
        results = await asyncio.gather(*(m.handle.stop(grace) for m in reversed(workers)), return_exceptions=True)
        errors += [r for r in results if isinstance(r, BaseException)]
        for head in (m for m in self.members if m.part.role == HEAD):
            try:
                head_code = await head.handle.stop(grace)
                code = head_code if self.serve is None else code
            except RuntimeUnavailable as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return code

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        """The last `lines` lines of all parts together, in time order, each marked "[role@node]"."""
        if lines <= 0:
            return ()
        tails = await asyncio.gather(*(_stamped_tail(m, lines) for m in self.members), return_exceptions=True)
        merged: list[tuple[str, int, str]] = []
        for order, (member, tail) in enumerate(zip(self.members, tails, strict=True)):
            if isinstance(tail, BaseException):
                merged.append(("", order, f"[{member.label}] (output unavailable: {tail})"))
                continue
            merged += [(stamp, order, f"[{member.label}] {text}") for stamp, text in tail]
        merged.sort(key=lambda item: (item[0], item[1]))
        return tuple(text for _, _, text in merged[-lines:])


async def _stamped_tail(member: Member, lines: int) -> list[tuple[str, str]]:
    container_id = member.handle.container_id

    def logs(client: docker.DockerClient) -> bytes:
        try:
            return client.api.logs(container_id, stdout=True, stderr=True, tail=lines, timestamps=True)
        except docker.errors.NotFound:
            return b""

    raw = await member.node.call(logs)
    out = []
    for line in raw.decode(errors="replace").splitlines():
        stamp, _, text = line.partition(" ")
        out.append((_sortable(stamp), text))
    return out


def _sortable(stamp: str) -> str:
    # RFC 3339 with nanoseconds, trailing zeros trimmed ("...:05.1Z"): pad the fraction to compare as text.
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{seconds}.{fraction:0<9}"


PortFree = Callable[[DockerNode, range], Awaitable[bool]]


async def ports_free(node: DockerNode, ports: range) -> bool:
    """Whether `ports` look free on `node`'s host network: a bind test of each on this machine; on another,
    nothing accepts connections on the first at the node's address (a port only bound there shows when the
    head fails to open it: the start is then tried on the next block)."""
    if node.is_local():
        return all(_bindable(port) for port in ports)
    return not await _accepts(node.address, ports[0])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class Rendezvous:
    """Picks, for each start of a group, the port its parts meet on at its head (Ray's GCS, SGLang's
    --dist-init-addr). Every part runs on the host network, so two groups whose heads share a node must not use
    one port: a start takes the first block of RENDEZVOUS_BLOCK ports from the configured one up that no running
    head of any gateway on that daemon holds (their labels), that the group's own HTTP ports leave alone, and
    that `is_free` finds free on the node. `lock` is held from the pick until the head's container runs, so two
    starts at once never pick the same block."""

    def __init__(self, is_free: PortFree = ports_free) -> None:
        self._is_free = is_free
        self.lock = asyncio.Lock()

    async def pick(self, head: DockerHost, base: int, avoid: Collection[int]) -> int:
        held = await head.call(_rendezvous_in_use)
        last = min(base + RENDEZVOUS_BLOCK * (RENDEZVOUS_BLOCKS - 1), 65536 - RENDEZVOUS_BLOCK)
        for first in range(base, last + 1, RENDEZVOUS_BLOCK):
            block = range(first, first + RENDEZVOUS_BLOCK)
            if any(port in block for port in avoid) or any(abs(first - other) < RENDEZVOUS_BLOCK for other in held):
                continue
            if await self._is_free(head.node, block):
                return first
        raise PartFailed(f"no free rendezvous port on {head.node.describe()} from {base} to "
                         f"{last + RENDEZVOUS_BLOCK - 1} (multinode.ray_port / dist_port is where the search begins)")


def _rendezvous_in_use(client: docker.DockerClient) -> set[int]:
    """The rendezvous ports of the running heads of every gateway instance on this daemon (one host network)."""
    heads = client.containers.list(filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_PART}={HEAD}"]},
                                   ignore_removed=True)
    return {port for port in map(_meeting_port, heads) if port is not None}


def _meeting_port(head: Container) -> int | None:
    label = head.labels.get(LABEL_RENDEZVOUS, "")
    if label.isdigit():
        return int(label)
    # A head started before the label existed: its command line says it.
    config = head.attrs.get("Config") or {}
    argv = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    for flag, value in itertools.pairwise(argv):
        if flag == "--dist-init-addr" or (flag == "--port" and argv[:1] == ["ray"]):
            port = value.rpartition(":")[2]
            return int(port) if port.isdigit() else None
    return None


async def start_group(spec: ModelSpec, engine: Engine, nodes: dict[str, DockerHost], instance: str,
                      rendezvous: Rendezvous | None = None) -> GroupHandle:
    """Start the parts of `spec` on `spec.placed_on` in order, each once the one before is up; then (vLLM) the
    serve command in the head. Raises RuntimeError naming the part that failed, after removing the others."""
    if len(spec.placed_on) != spec.nodes:
        raise RuntimeError(f"{spec.name} spans {spec.nodes} nodes but was placed on {len(spec.placed_on)} "
                           f"({', '.join(spec.placed_on) or 'none'}): placed_on must name each of them")
    unknown = [name for name in spec.placed_on if name not in nodes]
    if unknown:
        raise ValueError(f"unknown node {unknown[0]!r} (configured: {', '.join(nodes)})")
    placed = [nodes[name] for name in spec.placed_on]
    port = spec.port or free_port()
    spec_hash = spec.spec_hash()
    for node in {id(n): n for n in placed}.values():
        await node.call(lambda client: _remove_leftovers(client, spec.name, instance))

    members: list[Member] = []
    try:
        plan = await _start_head(spec, engine, placed, port, instance, rendezvous or Rendezvous(), members)
        for part, node in zip(plan.parts[1:], placed[1:], strict=True):
            config = part_config(spec, part, port, spec_hash, len(plan.parts), instance, plan.rendezvous,
                                 spec.placed_on)
            member = await _create(node, spec, part, config, instance)
            members.append(member)
            await _wait_up(member, spec.multinode.join_timeout)
            log.info("%s: %s is up", spec.name, part.describe())
        serve = await _exec_serve(members[0], plan) if plan.serve else None
    except BaseException:
        # Cancelled, refused by Docker, or a part failed: nothing half-started stays behind.
        await _remove_all(members)
        raise
    head = placed[0].node
    return GroupHandle(members, serve, http_url(head.address, port))


async def _start_head(spec: ModelSpec, engine: Engine, placed: Sequence[DockerHost], port: int, instance: str,
                      rendezvous: Rendezvous, members: list[Member]) -> GroupPlan:
    """Start the head (into `members`) on a rendezvous port of its own; returns the group's plan. A head that
    finds its port taken all the same (the pick could not see it taken: a remote node, or another process was
    quicker) is removed and started again on the next block."""
    avoid = set(range(port, port + len(placed)))  # the group's own HTTP ports (SGLang rank i: port + i)
    head_node, spec_hash = placed[0], spec.spec_hash()
    for attempt in range(1, RENDEZVOUS_ATTEMPTS + 1):
        async with rendezvous.lock:
            meet = await rendezvous.pick(head_node, rendezvous_base(spec), avoid)
            plan = plan_group(spec, engine, [n.node for n in placed], port, meet)
            config = part_config(spec, plan.head, port, spec_hash, len(plan.parts), instance, meet, spec.placed_on)
            member = await _create(head_node, spec, plan.head, config, instance)
            members.append(member)
        try:
            await _wait_up(member, spec.multinode.join_timeout)
        except PartFailed as exc:
            if attempt == RENDEZVOUS_ATTEMPTS or not exc.port_taken:
                raise
            log.info("%s: rendezvous port %d on %s is taken; trying the next ones", spec.name, meet,
                     head_node.node.describe())
            await _remove_all([member])
            members.remove(member)
            avoid.update(range(meet, meet + RENDEZVOUS_BLOCK))
            continue
        log.info("%s: %s is up (rendezvous port %d)", spec.name, plan.head.describe(), meet)
        return plan
    raise AssertionError("unreachable")


async def discover_groups(found: Sequence[tuple[DockerHost, Container]], nodes: Mapping[str, DockerHost],
                          listed: Collection[str], instance: str) -> list[Found]:
    """The groups that the parts found on the nodes (a gateway restart) belong to, one Found each. `nodes`: every
    node of the runtime; `listed`: those whose containers could be listed.

    The rule:
    - Every node of the group was listed: a complete group (every part running on the node its labels place it
      on, one spec, and for vLLM its serve process) is reported running, to be adopted like a single container;
      any other is reported stopped and not reusable: each part found is removed, keep_container or not (a half
      group serves nothing and holds memory).
    - A node of the group could not be listed: what runs there is unknown. If a part that was listed shows the
      group broken (not running, another spec, vLLM's serve process gone, a node no longer configured), the
      parts found are removed now, the others once their node answers (found alone then). Otherwise the group is
      reported running as it is, its unlisted parts known by their names: the waker adopts it (its readiness check
      decides; its memory counts on every node it spans, within the budgets) instead of stopping a head that may
      well serve, and the watch on each unlisted part ends the group, every part removed, if that part is gone or
      exited once its node answers.
    - Parts of an earlier version (no group nodes in their labels) while a node could not be listed: not
      reported this time; the next look (the waker's periodic rediscovery) decides.
    """
    by_model: dict[str, list[tuple[DockerHost, Container]]] = {}
    for node, container in found:
        by_model.setdefault(container.labels.get(LABEL_MODEL, "?"), []).append((node, container))
    groups: list[Found] = []
    for model, items in by_model.items():
        judged = await _judge_group(model, items, nodes, listed, instance)
        if judged is not None:
            groups.append(judged)
    return groups


async def _judge_group(model: str, items: list[tuple[DockerHost, Container]], nodes: Mapping[str, DockerHost],
                       listed: Collection[str], instance: str) -> Found | None:
    """One model's parts, judged by the rule of `discover_groups`; None: not reported this time."""
    items.sort(key=lambda item: _role_order(item[1].labels.get(LABEL_PART, "")))
    members = [Member(Part(c.labels.get(LABEL_PART, "?"), node.node.name, ()), node,
                      DockerHandle(node, c, "", keep=False)) for node, c in items]
    labels = items[0][1].labels
    hashes = {c.labels.get(LABEL_HASH, "") for _, c in items}
    spec_hash = next(iter(hashes)) if len(hashes) == 1 else ""
    group_nodes = tuple(n for n in labels.get(LABEL_GROUP_NODES, "").split(",") if n)
    size = _number(labels.get(LABEL_GROUP_SIZE))
    roles = [m.part.role for m in members]
    # One group: one spec, the same group labels on every part, each part once and on the node its role says.
    consistent = (len(hashes) == 1 and len(set(roles)) == len(roles)
                  and all(c.labels.get(LABEL_GROUP_NODES, "") == labels.get(LABEL_GROUP_NODES, "")
                          and c.labels.get(LABEL_GROUP_SIZE) == labels.get(LABEL_GROUP_SIZE) for _, c in items)
                  and (not group_nodes or (len(group_nodes) == size and all(
                      m.part.node in group_nodes and m.part.role == role_at(group_nodes.index(m.part.node))
                      for m in members))))
    running = all(c.status == "running" for _, c in items)
    ray = any((c.attrs.get("Config") or {}).get("Entrypoint") == ["ray"] for _, c in items)
    head_host = nodes.get(group_nodes[0], items[0][0]) if group_nodes else items[0][0]
    url = http_url(head_host.node.address, _number(labels.get(LABEL_PORT)))
    unlisted = [n for n in (group_nodes or tuple(nodes)) if n not in listed]

    if not unlisted:
        complete = consistent and running and roles == [role_at(i) for i in range(size)]
        serve = await _find_serve(members[0]) if complete and ray else None
        complete = complete and (serve is not None or not ray)
        handle = GroupHandle(members, serve, url)
        if not complete:
            log.info("%s: found an incomplete group of parts (%s): removing them", model, handle.ident)
        return Found(model, spec_hash, complete, handle, handle.nodes, reusable=False)
    if not group_nodes:
        log.warning("%s: found parts of a group (%s) while %s could not be listed: looked at again later", model,
                    ", ".join(m.label for m in members), ", ".join(unlisted))
        return None
    head_listed = members[0].part.role == HEAD
    broken = not consistent or not running or any(n not in nodes for n in unlisted)
    serve = await _find_serve(members[0]) if not broken and head_listed and ray else None
    broken = broken or (head_listed and ray and serve is None)
    if broken:
        handle = GroupHandle(members, None, url)
        log.info("%s: the parts found (%s) show their group broken while %s could not be listed: removing them",
                 model, handle.ident, ", ".join(unlisted))
        return Found(model, spec_hash, False, handle, handle.nodes, reusable=False)
    on_node = {m.part.node: m for m in members}
    whole = [on_node.get(name) or _by_name(nodes[name], model, role_at(index), instance)
             for index, name in enumerate(group_nodes)]
    handle = GroupHandle(whole, serve, url, serve_unknown=ray and not head_listed)
    log.warning("%s: %s could not be listed; its group (%s) is taken as it is, its parts there known by their names "
                "until the node answers", model, ", ".join(unlisted), handle.ident)
    return Found(model, spec_hash, True, handle, group_nodes, reusable=False)


def _by_name(node: DockerHost, model: str, role: str, instance: str) -> Member:
    """The part `role` of `model` on a node that could not be listed, known by its name until the node answers
    (Docker's API takes a name wherever it takes an id)."""
    name = part_container_name(model, role, instance)
    container = Container(attrs={"Id": name, "Name": f"/{name}"})
    return Member(Part(role, node.node.name, ()), node, DockerHandle(node, container, "", keep=False))


def _number(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def _role_order(role: str) -> int:
    if role == HEAD:
        return 0
    number = role.removeprefix("worker-")
    return int(number) if number.isdigit() else 1_000


async def _find_serve(head: Member) -> ServeProcess | None:
    container_id = head.handle.container_id

    def find(client: docker.DockerClient) -> str | None:
        try:
            exec_ids = client.api.inspect_container(container_id).get("ExecIDs") or ()
        except docker.errors.NotFound:  # removed since it was listed
            return None
        for exec_id in exec_ids:
            with contextlib.suppress(docker.errors.NotFound):
                info = client.api.exec_inspect(exec_id)
                if info.get("Running") and _SERVE_WRAPPER[-1] in info.get("ProcessConfig", {}).get("arguments", []):
                    return str(exec_id)
        return None

    exec_id = await head.node.call(find)
    return ServeProcess(head, exec_id) if exec_id else None


def _remove_leftovers(client: docker.DockerClient, model: str, instance: str) -> None:
    for old in client.containers.list(
            all=True, filters={"label": [f"{LABEL_MODEL}={model}", f"{LABEL_INSTANCE}={instance}"]},
            ignore_removed=True):
        log.info("removing leftover container %s of %s", old.short_id, model)
        remove_container(client, old.id)


async def _create(node: DockerHost, spec: ModelSpec, part: Part, config: dict[str, Any], instance: str) -> Member:
    name = part_container_name(spec.name, part.role, instance)

    def create(client: docker.DockerClient) -> Container:
        container = client.containers.create(spec.image, name=name, detach=True, **config)
        try:
            container.start()
        except docker.errors.APIError:
            container.remove(force=True)
            raise
        return container

    creating = asyncio.ensure_future(node.call(create))
    try:
        container = await asyncio.shield(creating)
    except asyncio.CancelledError:
        # Cancelled while Docker was creating it: let that finish, then remove what it made.
        with contextlib.suppress(Exception):
            made = await creating
            await node.call(lambda client: remove_container(client, str(made.id)))
        raise
    except docker.errors.ImageNotFound:
        raise PartFailed(f"{spec.name}: {part.describe()}: image {spec.image!r} is not on "
                         f"{node.node.describe()}: pull or build it there first") from None
    except docker.errors.APIError as exc:
        raise PartFailed(f"{spec.name}: Docker refused to run {part.describe()}: {exc.explanation or exc}") from None
    return Member(part, node, DockerHandle(node, container, "", keep=False))


async def _wait_up(member: Member, timeout: float) -> None:
    part, node, container_id = member.part, member.node, member.handle.container_id
    pattern = re.compile(part.up.log) if part.up.log else None
    deadline = time.monotonic() + timeout

    def look(client: docker.DockerClient) -> tuple[dict[str, Any], bool]:
        state = client.api.inspect_container(container_id)["State"]
        seen = pattern is None or bool(pattern.search(
            client.api.logs(container_id, stdout=True, stderr=True).decode(errors="replace")))
        return state, seen

    while True:
        state, seen = await node.call(look)
        if not state.get("Running"):
            tail = await member.handle.log_tail(20)
            end = Exit(int(state.get("ExitCode", -1)), bool(state.get("OOMKilled")))
            raise PartFailed(f"{part.describe()} exited with {end.describe()} while starting; its last lines: "
                             + " | ".join(tail), port_taken=any(_PORT_TAKEN.search(line) for line in tail))
        if seen and (part.up.port is None or await _accepts(node.node.address, part.up.port)):
            return
        if time.monotonic() >= deadline:
            tail = await member.handle.log_tail(20)
            raise PartFailed(f"{part.describe()} was not up within its join_timeout of {timeout:g}s; its last lines: "
                             + " | ".join(tail))
        await asyncio.sleep(_POLL)


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _exec_serve(head: Member, plan: GroupPlan) -> ServeProcess:
    container_id = head.handle.container_id
    assert plan.serve is not None

    def run(client: docker.DockerClient) -> str:
        made = client.api.exec_create(container_id, [*_SERVE_WRAPPER, *plan.serve])
        client.api.exec_start(made["Id"], detach=True)
        return str(made["Id"])

    try:
        exec_id = await head.node.call(run)
    except docker.errors.APIError as exc:
        raise PartFailed(f"Docker refused to run vllm serve in {head.part.describe()}: {exc.explanation or exc}") \
            from None
    return ServeProcess(head, exec_id)


async def _remove_all(members: Sequence[Member]) -> None:
    for member in reversed(members):
        with contextlib.suppress(Exception):
            await member.handle.stop(0.0)


__all__ = [
    "RENDEZVOUS_ATTEMPTS", "RENDEZVOUS_BLOCK", "GroupHandle", "Member", "PartFailed", "PortFree", "Rendezvous",
    "ServeProcess", "discover_groups", "part_config", "part_container_name", "ports_free", "start_group",
]
