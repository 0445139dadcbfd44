"""Chaos tests: failures injected on purpose (killed engines, hung engines, a vanishing Docker daemon,
a gateway restarted under load, bursts, clients that leave, bad input) and the outcome asserted.

The Docker fixtures are shared with tests/docker (same daemon, same locally built test image).
"""

from tests.docker.conftest import docker_client, model_name

__all__ = ["docker_client", "model_name"]
