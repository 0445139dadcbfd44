"""A models.d file that can't be a model file, seen from the outside: `/admin/reload` answers 422 in OpenAI's shape
naming the file and changes nothing, and `sparkgate check` prints the problem and exits 2 (they used to answer a bare
500 and print a traceback with exit 1). Each test here failed before its fix."""

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from gateway import cli
from gateway.app import build_waker, create_app
from gateway.settings import GatewaySettings
from waker.config.registry import load_dir

GOOD = {"name": "m", "engine": "generic", "command": ["python3", "server.py"]}


def not_utf8(models: Path) -> str:
    (models / "bad.yaml").write_bytes(b"name: x\nengine: generic\ncommand: [a]\n# caf\xe9\n")
    return "bad.yaml: not UTF-8 text"


def nested_too_deep(models: Path) -> str:
    (models / "bad.yaml").write_text("name: x\nargs: " + "[" * 2000 + "]" * 2000 + "\n")
    return "bad.yaml: line 2: nested deeper than"


def link_to_nothing(models: Path) -> str:
    (models / "bad.yaml").symlink_to(models / "gone.yml.bak")
    return "bad.yaml: a symbolic link to"


def directory(models: Path) -> str:
    (models / "bad.yaml").mkdir()
    return "bad.yaml: a directory, not a model file"


def key_given_twice(models: Path) -> str:
    (models / "bad.yaml").write_text("name: x\nengine: generic\ncommand: [a]\nname: y\n")
    return "bad.yaml: line 4: key 'name' is given twice"


def bad_environment(models: Path) -> str:
    (models / "bad.yaml").write_text(yaml.safe_dump({"name": "x", "command": ["a"], "env": {"A=B": "1"}}))
    return "bad.yaml: env: Value error, 'A=B' is not an environment variable name"


def endless_duration(models: Path) -> str:
    (models / "bad.yaml").write_text(yaml.safe_dump({"name": "x", "command": ["a"]}) + "idle_timeout: nan\n")
    return "bad.yaml: idle_timeout: Value error, a duration must be a finite number of seconds"


BAD = [not_utf8, nested_too_deep, link_to_nothing, directory, key_given_twice, bad_environment, endless_duration]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("SPARKGATE_CONFIG_DIR", "DOCKER_HOST", "SPARKGATE_API_KEYS", "SPARKGATE_ADMIN_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SPARKGATE_NODES", '{"local": {"total_gb": 128, "unified_memory": false}}')
    monkeypatch.setenv("SPARKGATE_STATS_DB", str(tmp_path / "stats.sqlite3"))  # never the user's own


@pytest.mark.parametrize("make_bad", BAD, ids=lambda f: f.__name__)
async def test_admin_reload_refuses_a_bad_file_with_a_422_and_changes_nothing(
        tmp_path: Path, make_bad: Callable[[Path], str]) -> None:
    models = tmp_path / "models.d"
    models.mkdir()
    (models / "m.yaml").write_text(yaml.safe_dump(GOOD))
    settings = GatewaySettings(config_dir=models)
    waker = build_waker(settings, load_dir(models))
    before = waker.registry
    expected = make_bad(models)
    app = create_app(settings, waker=waker)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8009") as client:
        answer = await client.post("/admin/reload")
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_config" and error["type"] == "invalid_request_error"
    assert expected in error["message"]
    assert waker.registry is before


@pytest.mark.parametrize("make_bad", BAD, ids=lambda f: f.__name__)
def test_check_prints_the_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              make_bad: Callable[[Path], str]) -> None:
    models = tmp_path / "models.d"
    models.mkdir()
    (models / "m.yaml").write_text(yaml.safe_dump(GOOD))
    expected = make_bad(models)
    assert cli.main(["check", "--config-dir", str(models)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparkgate: invalid models.d:") and expected in err and "Traceback" not in err
