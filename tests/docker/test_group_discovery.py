"""What a restarted gateway makes of the parts of a group it finds (issue 17), against the real Docker daemon: a half
group is removed (keep_container or not); a group with a part on a node that can't be listed is taken as it is, its
head never stopped for it; a container removed while the gateway looks is left out, never an error.

A node that can't be listed is this machine's daemon behind a unix socket of the test's own (`DaemonProxy`), taken
down and brought back; the other "node" is the daemon itself, as in test_multinode_runtime."""

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from docker.api.client import APIClient

from tests.docker.test_multinode_runtime import (  # noqa: F401 (multinode_image: the image check, autouse)
    A,
    B,
    group_spec,
    held,
    models_d_entry,
    multinode_image,
    parts,
    until_ready,
)
from tests.harness import run_gateway, write_models
from waker.engines.registry import engine_for
from waker.runtime.docker import group
from waker.runtime.docker.group import GroupHandle
from waker.runtime.docker.host import DockerNode
from waker.runtime.docker.runtime import DockerRuntime

pytestmark = pytest.mark.docker

DAEMON = (os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock").removeprefix("unix://")


class DaemonProxy:
    """This machine's Docker daemon behind a unix socket of its own: `down()` makes it unreachable (connections cut,
    the socket gone), `up()` brings it back. Runs in the test's event loop; the runtime's SDK calls come from their
    threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"unix://{path}"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_unix_server(self._connect, path=str(self.path))

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(DAEMON)
        except OSError:
            writer.close()
            return
        pair = {writer, upstream_writer}
        self._writers |= pair
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            self._writers -= pair


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        sink.close()


@pytest.fixture
async def proxy() -> AsyncIterator[DaemonProxy]:
    where = Path(tempfile.mkdtemp(prefix="i17-daemon-"))  # short: a unix socket's path has at most 107 bytes
    daemon = DaemonProxy(where / "docker.sock")
    yield daemon
    await daemon.down()
    shutil.rmtree(where, ignore_errors=True)


def nodes_with_b_at(url: str) -> dict[str, dict[str, Any]]:
    return {"a": {"total_gb": 20, "reserve_gb": 0, "memory_probe": "none"},
            "b": {"total_gb": 20, "reserve_gb": 0, "memory_probe": "none", "docker_host": url}}


async def test_an_incomplete_group_is_removed_at_boot_even_with_keep_container(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path, {**models_d_entry(model_name, "vllm"), "keep_container": True})
    body = {"model": model_name, "messages": [], "max_tokens": 2}
    nodes = nodes_with_b_at("unix://" + DAEMON)
    async with run_gateway(models, nodes=nodes) as gw, httpx.AsyncClient(timeout=60) as client:
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
    # While no gateway runs, the worker ends: its Ray head runs on, holding memory, but the group serves nothing.
    parts(docker_client, model_name)["worker-1"].kill()
    assert parts(docker_client, model_name)["head"].status == "running"

    async with run_gateway(models, nodes=nodes) as gw:
        assert parts(docker_client, model_name) == {}  # both parts, the running head too, removed at boot
        [stale] = [e for e in gw.waker.events.recent(model_name) if e.kind == "stale_engine"]
        assert "an incomplete group of parts" in stale.reason
        assert held(gw) == {"a": 0, "b": 0}


async def test_a_group_whose_worker_node_cannot_be_listed_at_boot_is_adopted_and_its_head_left_running(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str, proxy: DaemonProxy) -> None:
    models = write_models(tmp_path, models_d_entry(model_name, "vllm"))
    body = {"model": model_name, "messages": [], "max_tokens": 2}
    nodes = nodes_with_b_at(proxy.url)
    await proxy.up()
    async with run_gateway(models, nodes=nodes) as gw, httpx.AsyncClient(timeout=60) as client:
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
    before = {role: (c.id, c.attrs["State"]["StartedAt"]) for role, c in parts(docker_client, model_name).items()}
    assert set(before) == {"head", "worker-1"}

    await proxy.down()  # node b's daemon can't be reached when the next gateway boots
    async with run_gateway(models, nodes=nodes) as gw, httpx.AsyncClient(timeout=60) as client:
        await gw.waker.events.wait_for(lambda e: e.model == model_name and e.target == "ready", timeout=30)
        assert any("adopting running engine" in e.reason for e in gw.waker.events.recent(model_name))
        assert not [e for e in gw.waker.events.recent(model_name) if e.kind == "stale_engine"]
        assert held(gw) == {"a": 10, "b": 10}  # counted on both nodes, within their budgets
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        assert {r: (c.id, c.attrs["State"]["StartedAt"]) for r, c in parts(docker_client, model_name).items()} == before

        # Node b answers again: the next look (the waker's periodic rediscovery) finds the group it already runs.
        await proxy.up()
        await gw.waker._adopt_running_engines()
        assert not [e for e in gw.waker.events.recent(model_name) if e.kind == "stale_engine"]
        assert {r: (c.id, c.attrs["State"]["StartedAt"]) for r, c in parts(docker_client, model_name).items()} == before
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200

        # The part on b, known by its name while b was away, is watched: its end ends the group, every part removed.
        parts(docker_client, model_name)["worker-1"].kill()
        failed = await gw.waker.events.wait_for(lambda e: e.model == model_name and e.target == "failed", timeout=30)
        assert "exited unexpectedly" in failed.reason
        await gw.waker.events.wait_for(lambda e: e.kind == "removed" and e.model == model_name, timeout=30)
        assert parts(docker_client, model_name) == {}
        assert held(gw) == {"a": 0, "b": 0}


async def test_a_group_whose_head_node_cannot_be_listed_is_taken_as_it_is_and_its_serve_process_watched_later(
        docker_client: docker.DockerClient, model_name: str, proxy: DaemonProxy) -> None:
    nodes = {"node-a": DockerNode(name="node-a", url=proxy.url, address="127.0.0.1"), "node-b": B}
    await proxy.up()
    first = DockerRuntime(nodes, instance=f"test-{model_name}")
    try:
        started = await first.start(group_spec(model_name, "vllm"), engine_for("vllm"))
        assert isinstance(started, GroupHandle)
        await until_ready(started)
    finally:
        first.close()

    await proxy.down()
    later = DockerRuntime(nodes, instance=f"test-{model_name}")
    try:
        [found] = [f for f in await later.discover() if f.model == model_name]
        assert found.running and found.nodes == ("node-a", "node-b")
        assert isinstance(found.handle, GroupHandle) and found.handle.serve is None
        assert found.handle.ident == started.ident  # the same group, whether its parts were listed or named
        assert found.handle.root_url == started.root_url
        ended = asyncio.ensure_future(found.handle.wait_exit())

        await proxy.up()
        head = parts(docker_client, model_name)["head"]
        head.exec_run(["sh", "-c", f'kill "$(cat {group._PIDFILE})"'])  # vllm serve ends; the Ray head runs on
        end = await asyncio.wait_for(ended, timeout=30)
        assert end.part is not None and end.part.startswith("vllm serve in head on node 'node-a'")
        await found.handle.stop(5)
    finally:
        later.close()
    assert parts(docker_client, model_name) == {}


async def test_a_head_removed_between_the_listing_and_its_inspection_is_left_out(
        docker_client: docker.DockerClient, model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{model_name}")
    try:
        handle = await runtime.start(group_spec(model_name, "vllm"), engine_for("vllm"))
        await until_ready(handle)
        head_id = parts(docker_client, model_name)["head"].id
        inspect = APIClient.inspect_container

        def removed_first(self: APIClient, container: Any) -> Any:
            if container == head_id:  # listed a moment ago; gone now
                with contextlib.suppress(docker.errors.NotFound):
                    docker_client.api.remove_container(head_id, force=True)
            return inspect(self, container)

        monkeypatch.setattr(APIClient, "inspect_container", removed_first)
        found = [f for f in await runtime.discover() if f.model == model_name]
        monkeypatch.undo()
        assert [(f.running, f.handle.nodes) for f in found] == [(False, ("node-b",))]  # the worker, alone
        await runtime.discard(found[0], "test")
    finally:
        runtime.close()
    assert parts(docker_client, model_name) == {}


async def test_a_head_removed_while_its_serve_process_is_looked_for_makes_the_group_incomplete_not_an_error(
        docker_client: docker.DockerClient, model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{model_name}")
    try:
        handle = await runtime.start(group_spec(model_name, "vllm"), engine_for("vllm"))
        await until_ready(handle)
        find_serve = group._find_serve

        async def removed_first(head: group.Member) -> Any:
            await head.node.call(lambda client: client.api.remove_container(head.handle.container_id, force=True))
            return await find_serve(head)

        monkeypatch.setattr(group, "_find_serve", removed_first)
        [found] = [f for f in await runtime.discover() if f.model == model_name]
        monkeypatch.undo()
        assert not found.running and not found.reusable
        await runtime.discard(found, "test")
    finally:
        runtime.close()
    assert parts(docker_client, model_name) == {}
