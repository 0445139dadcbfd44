"""A model that spans several nodes: one container per node, started in order, watched and stopped as one.

The parts come from waker.engines.multinode (vLLM: Ray head, Ray workers, then `vllm serve` run in the head
container by `docker exec`; SGLang: one launch_server per rank). Each part starts on its own node's Docker
host only once the one before it is up, within `multinode.join_timeout`; a part that fails or never comes up
takes the parts already started down with it (no half-started group is left behind).

The group ends when ANY part ends: a Ray worker gone means vLLM can't serve either, and waiting for the
engine to notice would leave requests hanging. Stopping goes the other way round: the serving process
first, then the workers, the head last.
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from waker.config.spec import ModelSpec
from waker.engines.base import Engine
from waker.engines.multinode import HEAD, GroupPlan, Part, plan_group
from waker.runtime.base import Exit, Found, RuntimeUnavailable, free_port, http_url, run_to_end
from waker.runtime.docker.container import (
    LABEL_GROUP_SIZE,
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_MODEL,
    LABEL_NODE,
    LABEL_PART,
    LABEL_PORT,
    DockerHandle,
    container_name,
    remove_container,
    resources,
)
from waker.runtime.docker.host import DockerHost

log = logging.getLogger("sparkgate.docker")

SERVE_ROLE = "serve"
# `vllm serve` runs in the head container through this wrapper: it records its pid (docker has no API to
# signal an exec'd process; stop() signals it through another exec) and sends its output to the
# container's own stdout, so `docker logs` and log_tail show it beside Ray's.
_PIDFILE = "/tmp/sparkgate-serve.pid"
_SERVE_WRAPPER = ("sh", "-c", f'echo $$ > {_PIDFILE}; exec "$@" >/proc/1/fd/1 2>/proc/1/fd/2', "sparkgate-serve")
_POLL = 0.2


def part_container_name(model: str, role: str) -> str:
    return f"{container_name(model)}-{role}"


def part_config(spec: ModelSpec, part: Part, port: int, spec_hash: str, size: int, instance: str) -> dict[str, Any]:
    """The SDK's `containers.create` arguments for one part (pure): host network, our labels."""
    return {
        "entrypoint": list(part.argv[:1]),
        "command": list(part.argv[1:]),
        "environment": dict(part.env),
        "labels": {LABEL_MANAGED: "true", LABEL_MODEL: spec.name, LABEL_HASH: spec_hash, LABEL_PORT: str(port),
                   LABEL_NODE: part.node, LABEL_INSTANCE: instance, LABEL_PART: part.role,
                   LABEL_GROUP_SIZE: str(size)},
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
    pass


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
    """An engine made of several containers on several nodes (the EngineHandle protocol)."""

    def __init__(self, members: Sequence[Member], serve: ServeProcess | None, root_url: str) -> None:
        self.members = tuple(members)
        self.serve = serve
        self._url = root_url
        self._exit: Exit | None = None
        self._ended: asyncio.Future[Exit] | None = None

    @property
    def ident(self) -> str:
        return "containers " + ", ".join(f"{m.label}:{m.handle.ident.removeprefix('container ')}"
                                         for m in self.members)

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


async def start_group(spec: ModelSpec, engine: Engine, nodes: dict[str, DockerHost], instance: str) -> GroupHandle:
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
    plan = plan_group(spec, engine, [n.node for n in placed], port)
    spec_hash = spec.spec_hash()
    for node in {id(n): n for n in placed}.values():
        await node.call(lambda client: _remove_leftovers(client, spec.name, instance))

    members: list[Member] = []
    try:
        for part, node in zip(plan.parts, placed, strict=True):
            config = part_config(spec, part, port, spec_hash, len(plan.parts), instance)
            member = await _create(node, spec, part, config)
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


async def discover_groups(found: Sequence[tuple[DockerHost, Container]]) -> list[Found]:
    """The groups that parts found on the nodes (a gateway restart) belong to, one Found each.

    A complete group (every part running, and for vLLM its serve process) is reported running, with its
    nodes head first, to be adopted like a single container; any other is reported stopped, to be removed.
    """
    by_model: dict[str, list[tuple[DockerHost, Container]]] = {}
    for node, container in found:
        by_model.setdefault(container.labels.get(LABEL_MODEL, "?"), []).append((node, container))
    groups: list[Found] = []
    for model, items in by_model.items():
        items.sort(key=lambda item: _role_order(item[1].labels.get(LABEL_PART, "")))
        members = [Member(Part(c.labels.get(LABEL_PART, "?"), node.node.name, ()), node,
                          DockerHandle(node, c, "", keep=False)) for node, c in items]
        head_node, head = items[0]
        hashes = {c.labels.get(LABEL_HASH, "") for _, c in items}
        roles = [m.part.role for m in members]
        size = int(head.labels.get(LABEL_GROUP_SIZE, "0"))
        complete = (len(hashes) == 1 and roles[0] == HEAD and len(set(roles)) == len(roles) == size
                    and all(c.status == "running" for _, c in items))
        serve = None
        if complete and head.attrs.get("Config", {}).get("Entrypoint") == ["ray"]:
            serve = await _find_serve(members[0])
            complete = serve is not None
        handle = GroupHandle(members, serve, http_url(head_node.node.address, int(head.labels.get(LABEL_PORT, "0"))))
        if not complete:
            log.info("%s: found an incomplete group of parts (%s): not adoptable", model, handle.ident)
        groups.append(Found(model, hashes.pop() if len(hashes) == 1 else "", complete, handle, handle.nodes))
    return groups


def _role_order(role: str) -> int:
    if role == HEAD:
        return 0
    number = role.removeprefix("worker-")
    return int(number) if number.isdigit() else 1_000


async def _find_serve(head: Member) -> ServeProcess | None:
    container_id = head.handle.container_id

    def find(client: docker.DockerClient) -> str | None:
        for exec_id in client.api.inspect_container(container_id).get("ExecIDs") or ():
            with contextlib.suppress(docker.errors.NotFound):
                info = client.api.exec_inspect(exec_id)
                if info.get("Running") and _SERVE_WRAPPER[-1] in info.get("ProcessConfig", {}).get("arguments", []):
                    return str(exec_id)
        return None

    exec_id = await head.node.call(find)
    return ServeProcess(head, exec_id) if exec_id else None


def _remove_leftovers(client: docker.DockerClient, model: str, instance: str) -> None:
    for old in client.containers.list(
            all=True, filters={"label": [f"{LABEL_MODEL}={model}", f"{LABEL_INSTANCE}={instance}"]}):
        log.info("removing leftover container %s of %s", old.short_id, model)
        remove_container(client, old.id)


async def _create(node: DockerHost, spec: ModelSpec, part: Part, config: dict[str, Any]) -> Member:
    name = part_container_name(spec.name, part.role)

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
                             + " | ".join(tail))
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
    "GroupHandle", "Member", "PartFailed", "ServeProcess", "discover_groups", "part_config", "part_container_name",
    "start_group",
]
