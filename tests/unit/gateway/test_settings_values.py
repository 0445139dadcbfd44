"""SPARKGATE_* values that parse but can't work are refused at startup, naming the variable: every float setting
is finite (an upstream timeout of nan made every request a 500), intervals that can't be 0 are positive, and a JSON
object with a key given twice (two nodes of one name) is an error, not the last one silently. Each test here failed
before its fix."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import SettingsError

from gateway import cli
from gateway.settings import GatewaySettings

FLOATS = sorted(name for name, field in GatewaySettings.model_fields.items() if field.annotation is float)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("SPARKGATE_NODES", "SPARKGATE_CONFIG_DIR", "DOCKER_HOST", "SPARKGATE_API_KEYS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SPARKGATE_STATS_DB", str(tmp_path / "stats.sqlite3"))  # never the user's own


def refusal(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> list[str]:
    """The problems `sparkgate` prints for SPARKGATE_<name>=value, one per line."""
    monkeypatch.setenv(f"SPARKGATE_{name.upper()}", value)
    with pytest.raises((ValidationError, SettingsError)) as err:
        GatewaySettings()
    from gateway.settings import settings_problems

    return settings_problems(err.value)


def test_every_float_setting_is_covered() -> None:
    assert {"upstream_read_timeout", "upstream_connect_timeout", "probe_interval", "reap_interval", "max_hold",
            "max_wait", "stats_interval", "request_timeout", "keepalive_interval"} <= set(FLOATS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity", "1e999"])
@pytest.mark.parametrize("name", FLOATS)
def test_float_settings_are_finite(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    [problem] = refusal(monkeypatch, name, value)
    assert problem.startswith(f"SPARKGATE_{name.upper()}: ") and "finite" in problem


@pytest.mark.parametrize("name", ["probe_interval", "probe_timeout", "reap_interval"])
def test_intervals_that_cannot_be_zero_are_positive(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    [problem] = refusal(monkeypatch, name, "0")
    assert problem == f"SPARKGATE_{name.upper()}: Input should be greater than 0"


@pytest.mark.parametrize(("name", "value"), [("keepalive_interval", 0.0), ("stats_interval", 0.0),
                                             ("request_timeout", 0.0), ("upstream_read_timeout", 90.0)])
def test_zero_where_it_means_off_and_durations_still_pass(monkeypatch: pytest.MonkeyPatch, name: str,
                                                          value: float) -> None:
    monkeypatch.setenv(f"SPARKGATE_{name.upper()}", "0" if value == 0 else "90s")
    assert getattr(GatewaySettings(), name) == value


@pytest.mark.parametrize(("nodes", "where"), [
    ('{"local": {"total_gb": Infinity}}', "SPARKGATE_NODES['local']['total_gb']: Input should be a finite number"),
    ('{"local": {"reserve_gb": NaN}}', "SPARKGATE_NODES['local']['reserve_gb']: Input should be a finite number"),
    ('{"local": {"memory_probe_interval": "nan"}}', "SPARKGATE_NODES['local']['memory_probe_interval']: "),
])
def test_node_numbers_are_finite(monkeypatch: pytest.MonkeyPatch, nodes: str, where: str) -> None:
    [problem] = refusal(monkeypatch, "nodes", nodes)
    assert problem.startswith(where)


@pytest.mark.parametrize(("name", "value", "key"), [
    ("nodes", '{"spark": {"total_gb": 128}, "spark": {"docker_host": "ssh://me@spark2"}}', "spark"),
    ("nodes", '{"local": {"total_gb": 128, "total_gb": 64}}', "total_gb"),
    ("api_keys", '[{"key": "sk-one", "name": "laptop", "models": ["*"], "models": ["small"]}]', "models"),
])
def test_a_json_key_given_twice_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str, key: str) -> None:
    [problem] = refusal(monkeypatch, name, value)
    assert f'"{name}"' in problem and f"the key {key!r} is given twice in one JSON object" in problem


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("SPARKGATE_UPSTREAM_READ_TIMEOUT", "nan", "SPARKGATE_UPSTREAM_READ_TIMEOUT: Value error, a duration must be "
                                               "a finite number of seconds, not nan"),
    ("SPARKGATE_NODES", '{"a": {}, "a": {}}', "the key 'a' is given twice"),
])
def test_check_refuses_bad_settings_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], variable: str, value: str,
                                                said: str) -> None:
    models = tmp_path / "models.d"
    models.mkdir()
    (models / "m.yaml").write_text(yaml.safe_dump({"name": "m", "command": ["a"]}))
    monkeypatch.setenv(variable, value)
    assert cli.main(["check", "--config-dir", str(models)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparkgate: invalid settings:") and said in err
