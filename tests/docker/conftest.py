"""Docker tests run against the real daemon and the locally built image (tests/docker/build_image.sh)."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from waker.runtime.docker.container import LABEL_MODEL

IMAGE = os.environ.get("SPARKGATE_TEST_IMAGE", "sparkgate-test-engine:1")
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    # No skip: without a daemon or the image these tests fail (CI must notice). Deselect them
    # locally with -m "not docker".
    client = docker.from_env()
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"test image {IMAGE} is missing: run tests/docker/build_image.sh")
    return client


@pytest.fixture
def model_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh model name; every container of that model is removed afterwards."""
    name = f"dk-{uuid.uuid4().hex[:8]}"
    yield name
    for container in docker_client.containers.list(all=True, filters={"label": f"{LABEL_MODEL}={name}"}):
        container.remove(force=True)


def docker_engine_spec(name: str, *flags: str, **fields: Any) -> dict[str, Any]:
    """A models.d entry running tests/fake_engine.py in a container of the test image."""
    return {
        "name": name,
        "runtime": "docker",
        "engine": "generic",
        "image": IMAGE,
        "command": ["python3", "/opt/tests/fake_engine.py", "--host", "{host}", "--port", "{port}",
                    "--model", "{served_name}", *flags],
        "volumes": [f"{TESTS}:/opt/tests:ro"],
        "start_timeout": "30s",
        "stop_timeout": "5s",
        "min_uptime": 0,
        **fields,
    }
