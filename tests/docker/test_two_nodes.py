"""Two nodes on this machine's Docker engine: engines are placed by labels and room, routed to the node
they run on (each node publishes on its own address), and each node's budget is its own."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from tests.docker.conftest import docker_engine_spec
from tests.harness import run_gateway, write_models
from waker.runtime.docker.container import LABEL_MODEL, LABEL_NODE
from waker.state import ModelState

pytestmark = pytest.mark.docker

NODES = {
    # Both are this machine's daemon; "b" publishes its engines on 127.0.0.2 only, so a request routed
    # to the wrong node's address would find nothing there.
    "a": {"total_gb": 40, "reserve_gb": 0, "labels": {"gpu": "big"}, "memory_probe": "none"},
    "b": {"total_gb": 20, "reserve_gb": 0, "labels": {"gpu": "small"}, "memory_probe": "none",
          "address": "127.0.0.2", "publish_ip": "127.0.0.2"},
}


@pytest.fixture
def names(docker_client: docker.DockerClient) -> Iterator[dict[str, str]]:
    prefix = f"two-{uuid.uuid4().hex[:6]}"
    chosen = {role: f"{prefix}-{role}" for role in ("big", "any", "small")}
    yield chosen
    for name in chosen.values():
        for container in docker_client.containers.list(all=True, filters={"label": f"{LABEL_MODEL}={name}"}):
            container.remove(force=True)


def node_of(client: docker.DockerClient, model: str) -> tuple[str, str]:
    [container] = client.containers.list(filters={"label": f"{LABEL_MODEL}={model}"})
    [binding] = container.attrs["HostConfig"]["PortBindings"]["8000/tcp"]
    return container.labels[LABEL_NODE], binding["HostIp"]


async def test_engines_are_placed_routed_and_budgeted_per_node(
        tmp_path: Path, docker_client: docker.DockerClient, names: dict[str, str]) -> None:
    models = write_models(
        tmp_path,
        docker_engine_spec(names["big"], memory_gb=30, node_labels={"gpu": "big"}),
        docker_engine_spec(names["any"], memory_gb=15),
        docker_engine_spec(names["small"], memory_gb=15, node_labels={"gpu": "small"}),
    )
    async with run_gateway(models, nodes=NODES) as gw, httpx.AsyncClient(timeout=60) as client:
        async def ask(model: str) -> None:
            resp = await client.post(gw.v1 + "/chat/completions",
                                     json={"model": model, "messages": [], "max_tokens": 2})
            assert resp.status_code == 200, resp.text
            assert resp.json()["model"] == model

        await ask(names["big"])
        assert node_of(docker_client, names["big"]) == ("a", "127.0.0.1")
        await ask(names["any"])  # 10 GB left on a, 20 on b: b, without evicting anything
        assert node_of(docker_client, names["any"]) == ("b", "127.0.0.2")
        nodes = (await client.get(gw.url + "/admin/state")).json()["nodes"]
        assert {n: v["held_gb"] for n, v in nodes.items()} == {"a": 30, "b": 15}
        assert nodes["b"]["labels"] == {"gpu": "small"}

        # b is full for "small" (which may only run there): b evicts its own idle model; a is untouched.
        await ask(names["small"])
        assert node_of(docker_client, names["small"]) == ("b", "127.0.0.2")
        assert gw.waker.controller(names["any"]).state is ModelState.STOPPED
        assert gw.waker.controller(names["big"]).state is ModelState.READY
        assert {n: a.held_gb() for n, a in gw.waker.admissions.items()} == {"a": 30, "b": 15}
        assert all(a.high_water_gb <= a.budget.capacity_gb for a in gw.waker.admissions.values())
        evictions = [e for e in gw.waker.events.recent() if e.kind == "evict"]
        assert [e.model for e in evictions] == [names["any"]]

        # Asked again, "any" goes where there is room now... nowhere without evicting: a's 10 GB are too
        # few, so the least valuable idle model goes (fewest victims, least recently used: "big" on a).
        await ask(names["any"])
        assert node_of(docker_client, names["any"])[0] == "a"
        assert gw.waker.controller(names["small"]).state is ModelState.READY
        state = {m["name"]: m for m in (await client.get(gw.url + "/admin/state")).json()["models"]}
        assert state[names["any"]]["node"] == "a" and state[names["any"]]["held_on"] == {"a": 15}
        for name in names.values():
            await gw.waker.stop(name)
