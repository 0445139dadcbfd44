import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked `engine` or `docker` need parts a developer may lack; in CI they must run and
    # fail loudly if the parts are missing, never skip.
    if os.environ.get("CI"):
        return
